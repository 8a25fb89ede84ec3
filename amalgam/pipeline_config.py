"""Config files of the nightly run and the sweep: pydantic models read from YAML."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError

from amalgam.config_file import load_yaml
from amalgam.errors import RecipeError
from amalgam.recipe import ParamValue, Recipe, StorageOptions, parse_recipe, redact_options


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _redact_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    options = recipe.get("storage_options")
    if not isinstance(options, dict):
        return recipe
    return {**recipe, "storage_options": redact_options(options)}


class NightlyConfig(_Strict):
    """Where new experts appear, and the recipe that absorbs them into the champion.

    ``recipe`` is a recipe without ``models``: each night its ``models`` are the experts found
    under ``experts`` that the champion has not absorbed yet. Its ``method`` is a continual
    method (``continual_ta``, ``opcm``); ``register`` names the model and its gates.
    """

    experts: str
    # the recipe's storage options, like ``storage_options``, never in a JSON form or repr
    recipe: Annotated[dict[str, Any], PlainSerializer(_redact_recipe, when_used="json")] = Field(
        repr=False
    )
    workdir: str | None = None
    executor: Literal["local", "ray"] = "local"
    storage_options: StorageOptions | None = Field(default=None, repr=False)

    def recipe_for(self, models: list[dict[str, Any]]) -> Recipe:
        """The nightly recipe with ``models`` filled in (validated like any recipe)."""
        return parse_recipe({**self.recipe, "models": models}, "nightly recipe")

    @property
    def model_name(self) -> str:
        return self.template.register.model_name  # type: ignore[union-attr]

    @property
    def template(self) -> Recipe:
        """The recipe with a placeholder model, for its sections and options."""
        return self.recipe_for([{"uri": self.experts}])

    @property
    def expert_options(self) -> dict[str, Any]:
        if self.storage_options is not None:
            return self.storage_options
        return self.template.storage_options


class GridPoint(_Strict):
    """One sweep candidate: a method and its shared parameter values."""

    method: str
    params: dict[str, ParamValue] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        values = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({values})"


class Grid(_Strict):
    """A sweep: for each method, lists of values whose cartesian product is tried."""

    methods: dict[str, dict[str, list[ParamValue]]] = Field(min_length=1)
    # the leaderboard's order: a report metric, higher is better
    metric: Literal["mean_normalized_accuracy", "mean_accuracy"] = "mean_accuracy"

    def points(self) -> list[GridPoint]:
        out = []
        for method, axes in self.methods.items():
            keys = sorted(axes)
            for values in itertools.product(*(axes[k] for k in keys)):
                out.append(GridPoint(method=method, params=dict(zip(keys, values, strict=True))))
        return out


def _load_yaml(path: str | Path) -> Any:
    """The config's YAML, read like a recipe: size limits, ``${VAR}`` from the environment
    (an unset one is an error), so that keys can stay out of the file."""
    return load_yaml(path, "config")


def _validate(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise RecipeError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def load_nightly_config(path: str | Path) -> NightlyConfig:
    """Read and check a nightly config (its recipe must name ``register.model_name``)."""
    config = _validate(NightlyConfig, _load_yaml(path), str(path))
    try:
        template = config.template
    except RecipeError as exc:
        raise RecipeError(f"{path}: recipe: {exc}") from None
    if template.register is None:
        raise RecipeError(f"{path}: recipe.register: the nightly run needs a model name and gates")
    if template.evaluate is None:
        raise RecipeError(f"{path}: recipe.evaluate: the nightly run must evaluate its candidate")
    return config


def load_grid(path: str | Path) -> Grid:
    """Read a sweep grid YAML."""
    return _validate(Grid, _load_yaml(path), str(path))
