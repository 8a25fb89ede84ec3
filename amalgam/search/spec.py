"""The search spec (YAML): the recipe to tune, the space of its parameters, the objective,
the budget; and the map between a CMA-ES point in the unit cube and a recipe."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amalgam.checkpoint import open_checkpoint
from amalgam.config_file import load_yaml
from amalgam.errors import RecipeError
from amalgam.methods import get_method
from amalgam.recipe import Recipe, load_recipe, parse_recipe
from amalgam.storage import amalgam_home

Split = Literal["validation", "test"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bound(_Strict):
    """The range one parameter is searched in."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Bound:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class Objective(_Strict):
    """A weighted mean of task accuracies on ``split``; ``heldout`` is scored for the start
    point and the best only, and never steers the search."""

    tasks: dict[str, float] = Field(min_length=1)
    split: Split = "validation"
    heldout: Split | None = "test"
    limit: int | None = Field(default=None, gt=0)  # records per task of the search split
    heldout_limit: int | None = Field(default=None, gt=0)  # of the held-out split (None: all)

    @model_validator(mode="after")
    def _weights(self) -> Objective:
        bad = [t for t, w in self.tasks.items() if not w > 0]
        if bad:
            raise ValueError(f"task weights must be positive: {bad}")
        if self.heldout == self.split:
            raise ValueError(f"heldout: the search split {self.split!r} is not held out")
        return self


class SearchSpec(_Strict):
    """``amalgam search SPEC.yaml``: CMA-ES over ``space`` for ``recipe``'s method."""

    recipe: str  # the recipe file (relative to the spec's folder); its evaluate.tasks_dir
    space: dict[str, Bound] = Field(min_length=1)
    layer_groups: int = Field(default=1, ge=1)  # >1: every value once per group of layers
    objective: Objective
    generations: int = Field(default=10, gt=0)
    population: int | None = Field(default=None, ge=4)  # default: 4 + 3 ln(dims); mu >= 2
    sigma: float = Field(default=0.3, gt=0.0)  # initial step, in units of each range
    seed: int = 0
    workers: int = Field(default=1, gt=0)  # candidates scored at a time
    executor: Literal["ray", "local"] = "ray"
    scratch: Literal["auto", "memory", "disk"] = "auto"
    memory_limit_bytes: int = Field(default=2 * 1024**3, gt=0)  # "auto": in memory below it
    state: str | None = None  # checkpoint folder; default $AMALGAM_HOME/searches/<hash>
    output: str | None = None  # the best recipe's file; default <state>/best.yaml

    def digest(self, recipe: Recipe) -> str:
        """Hash of everything that decides the trials: the spec (not where its files go or
        how many run at a time) and the recipe's content."""
        data = self.model_dump(
            mode="json", exclude={"recipe", "state", "output", "workers", "executor"}
        )
        data["recipe"] = recipe.hash()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Coordinate:
    """One searched value: a parameter, for one model (None: shared), in one group of
    tensors (None: the whole model, or the tensors outside every layer group)."""

    param: str
    model: str | None
    group: tuple[int, ...] | None
    low: float
    high: float
    integer: bool

    @property
    def name(self) -> str:
        where = "" if self.model is None else f"[{self.model}]"
        if self.group is not None:
            where += f"@layers{self.group[0]}-{self.group[-1]}"
        return self.param + where

    def value(self, x: float) -> float | int:
        v = self.low + min(max(x, 0.0), 1.0) * (self.high - self.low)
        return round(v) if self.integer else float(v)

    def unit(self, value: Any) -> float:
        """``value`` as a point of [0, 1] (the middle when it is not a number in range)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.5
        return min(max((value - self.low) / (self.high - self.low), 0.0), 1.0)


@dataclass(frozen=True)
class Space:
    """The recipe and its searched coordinates, in a fixed order."""

    recipe: Recipe
    coordinates: tuple[Coordinate, ...]

    def start(self) -> list[float]:
        """The recipe's own values as a point of the unit cube."""
        out = []
        for c in self.coordinates:
            if c.model is None:
                value = self.recipe.params.get(c.param, _default(self.recipe, c.param))
            else:
                spec = next(m for m in self.recipe.models if m.label == c.model)
                value = spec.params.get(c.param, _default(self.recipe, c.param))
            out.append(c.unit(value))
        return out

    def values(self, x: list[float]) -> dict[str, float | int]:
        return {c.name: c.value(v) for c, v in zip(self.coordinates, x, strict=True)}

    def recipe_at(self, x: list[float]) -> Recipe:
        """The recipe with the point's values: whole-model values in ``params`` and each
        model's ``params``, layer groups as overrides (placed before the recipe's own)."""
        data = self.recipe.model_dump(exclude={"output"}, exclude_none=True)
        groups: dict[tuple[int, ...], dict[str, Any]] = {}
        for c, v in zip(self.coordinates, x, strict=True):
            value = c.value(v)
            if c.group is not None:
                entry = groups.setdefault(c.group, {"params": {}, "models": {}})
                target = entry["params"] if c.model is None else entry["models"]
                if c.model is not None:
                    target = target.setdefault(c.model, {})
                target[c.param] = value
            elif c.model is None:
                data["params"][c.param] = value
            else:
                index = [m.label for m in self.recipe.models].index(c.model)
                data["models"][index].setdefault("params", {})[c.param] = value
        overrides = [{"match": layer_match(g), **entry} for g, entry in groups.items()]
        data["overrides"] = overrides + data.get("overrides", [])
        return parse_recipe(data, "search candidate")


def _default(recipe: Recipe, param: str) -> Any:
    found = get_method(recipe.method).param(param)
    return None if found is None else found.default


def layer_match(layers: tuple[int, ...]) -> str:
    """The regex of the tensors of ``layers`` (``...layers.<i>....``)."""
    return r"(^|\.)layers\.(" + "|".join(str(i) for i in layers) + r")\."


def layer_groups(layers: int, groups: int) -> list[tuple[int, ...]]:
    """``layers`` split into ``groups`` contiguous runs, sizes differing by one at most."""
    if groups > layers:
        raise RecipeError(f"layer_groups: {groups} groups for a model of {layers} layers")
    bounds = [round(i * layers / groups) for i in range(groups + 1)]
    return [tuple(range(bounds[i], bounds[i + 1])) for i in range(groups)]


def build_space(spec: SearchSpec, recipe: Recipe) -> Space:
    """The coordinates of ``spec.space`` for ``recipe``'s method and models; an unknown or
    non-numeric parameter, or a range outside the parameter's, is a RecipeError naming it."""
    method = get_method(recipe.method)
    groups: list[tuple[int, ...] | None] = [None]
    if spec.layer_groups > 1:
        layers = _layer_count(recipe)
        groups += layer_groups(layers, spec.layer_groups)
    coords = []
    for name, bound in spec.space.items():
        param = method.param(name)
        where = f"space.{name}"
        if param is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise RecipeError(
                f"{where}: method '{recipe.method}' has no parameter '{name}' (its parameters: "
                f"{known})"
            )
        if param.kind not in (float, int):
            raise RecipeError(f"{where}: '{name}' is not a number and cannot be searched")
        param.check(bound.low, f"{where}.low")
        param.check(bound.high if param.kind is float else round(bound.high), f"{where}.high")
        models = [m.label for m in recipe.models] if param.per_model else [None]
        for group in groups:
            for model in models:
                coords.append(
                    Coordinate(name, model, group, bound.low, bound.high, param.kind is int)
                )
    return Space(recipe, tuple(coords))


def _layer_count(recipe: Recipe) -> int:
    source = recipe.base or recipe.models[0].uri
    ckpt = open_checkpoint(source, **recipe.storage_options)
    try:
        layers = (ckpt.config or {}).get("num_hidden_layers")
    finally:
        ckpt.close()
    if not isinstance(layers, int):
        raise RecipeError(f"layer_groups: {source} has no num_hidden_layers in its config")
    return layers


def check_tasks(spec: SearchSpec, recipe: Recipe) -> Path:
    """The recipe's task folder, after checking that it holds every objective task's splits
    (an unknown task is a RecipeError naming it)."""
    if recipe.evaluate is None or recipe.evaluate.tasks_dir is None:
        raise RecipeError("recipe: a search needs the recipe's evaluate.tasks_dir")
    tasks_dir = Path(recipe.evaluate.tasks_dir)
    known = sorted(p.name for p in tasks_dir.iterdir() if p.is_dir()) if tasks_dir.is_dir() else []
    splits = [s for s in (spec.objective.split, spec.objective.heldout) if s]
    for task in spec.objective.tasks:
        if task not in known:
            raise RecipeError(
                f"objective.tasks: unknown task '{task}' (not in {tasks_dir}; known: "
                f"{', '.join(known) or 'none'})"
            )
        for split in splits:
            if not (tasks_dir / task / f"{split}.jsonl").is_file():
                raise RecipeError(f"objective.tasks: task '{task}' has no {split} split")
    return tasks_dir


def parse_search_spec(data: Any, source: str, folder: Path | None = None) -> SearchSpec:
    """A validated spec; the recipe path is resolved against ``folder``."""
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(x) for x in err['loc']) or 'spec'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise RecipeError(f"{source}: invalid search spec:\n  " + "\n  ".join(lines)) from None
    if folder is not None and not Path(spec.recipe).is_absolute():
        spec = spec.model_copy(update={"recipe": str(folder / spec.recipe)})
    return spec


def load_search_spec(path: str | Path) -> SearchSpec:
    return parse_search_spec(load_yaml(path, "search spec"), str(path), Path(path).parent)


@dataclass(frozen=True)
class Prepared:
    """A spec checked against its recipe: the space, the task folder, the state folder."""

    spec: SearchSpec
    space: Space
    tasks_dir: Path
    state: Path
    digest: str

    @property
    def output(self) -> Path:
        return Path(self.spec.output) if self.spec.output else self.state / "best.yaml"


def prepare(spec: SearchSpec) -> Prepared:
    """Everything checked before any trial runs."""
    recipe = load_recipe(spec.recipe)
    space = build_space(spec, recipe)
    tasks_dir = check_tasks(spec, recipe)
    digest = spec.digest(recipe)
    state = Path(spec.state) if spec.state else amalgam_home() / "searches" / digest
    return Prepared(spec, space, tasks_dir, state, digest)
