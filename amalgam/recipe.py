"""Recipes: what to merge, how, and where to write it (pydantic, loaded from YAML)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from amalgam.errors import RecipeError
from amalgam.merge.base import Method, get_method

ParamValue = bool | int | float | str | list[float]
DTYPES = ("float32", "float16", "bfloat16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One input model: where it is, a short name, and its own parameter values.

    Data-driven methods read the model's statistics: ``statistics`` names a precomputed
    artifact, else they are computed (once, then cached) by running the model on ``data``, a
    task folder (its validation split) or a jsonl of text records.
    """

    uri: str
    name: str | None = None
    params: dict[str, ParamValue] = Field(default_factory=dict)
    data: str | None = None
    statistics: str | None = None

    @property
    def label(self) -> str:
        return self.name or PurePosixPath(self.uri.rstrip("/")).name


class Override(_Strict):
    """Parameter values for tensors whose name matches ``match`` (a regex, re.search)."""

    match: str
    params: dict[str, ParamValue] = Field(default_factory=dict)
    models: dict[str, dict[str, ParamValue]] = Field(default_factory=dict)

    @field_validator("match")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regex {v!r}: {exc}") from exc
        return v


class Recipe(_Strict):
    """A merge recipe. Later overrides win over earlier ones; per-model values win over shared."""

    method: str
    base: str | None = None
    models: list[ModelSpec] = Field(min_length=1)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: int = 0
    output: str | None = None
    max_shard_size: int = Field(default=5 * 10**9, gt=0)
    files_from: str | None = None
    allow_nonfinite: bool = False
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @property
    def method_spec(self) -> Method:
        return get_method(self.method)

    def hash(self) -> str:
        """sha256 of the recipe's canonical JSON, output location excluded."""
        body = self.model_dump(mode="json", exclude={"output", "storage_options"})
        return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def validate_method(self) -> None:
        """Check the recipe against the method contract; one error lists every problem."""
        method = self.method_spec
        problems: list[str] = []
        n = len(self.models)
        if method.needs_base and self.base is None:
            problems.append(f"base: method '{method.name}' needs a base model")
        if n < method.min_models:
            problems.append(f"models: '{method.name}' needs at least {method.min_models} models")
        if method.max_models is not None and n > method.max_models:
            problems.append(f"models: '{method.name}' takes at most {method.max_models} models")
        if method.name == "slerp" and (n == 2) == (self.base is not None):
            problems.append("models: slerp takes a base and one model, or two models and no base")
        labels = [m.label for m in self.models]
        if self.base is not None and "base" in labels:
            problems.append(
                "models: a model is named 'base', which names the base model; give it another name"
            )
        for dup in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"models: two models are named {dup!r}; give them distinct names")

        def check(values: dict[str, Any], where: str, per_model: bool) -> None:
            for key, value in values.items():
                param = method.param(key)
                if param is None:
                    known = ", ".join(p.name for p in method.params) or "none"
                    problems.append(
                        f"{where}.{key}: unknown parameter for '{method.name}' (known: {known})"
                    )
                elif per_model and not param.per_model:
                    problems.append(f"{where}.{key}: a shared parameter, not settable per model")
                else:
                    try:
                        param.check(value, f"{where}.{key}")
                    except RecipeError as exc:
                        problems.append(str(exc))

        check(self.params, "params", False)
        for i, m in enumerate(self.models):
            check(m.params, f"models[{i}].params", True)
            if method.statistics is None and (m.data or m.statistics):
                field = "data" if m.data else "statistics"
                problems.append(f"models[{i}].{field}: method '{method.name}' reads no statistics")
            if method.statistics is not None and not (m.data or m.statistics):
                problems.append(
                    f"models[{i}]: method '{method.name}' needs statistics: give data: (a task "
                    "folder or jsonl) or statistics: (an artifact)"
                )
        for j, o in enumerate(self.overrides):
            check(o.params, f"overrides[{j}].params", False)
            for label, values in o.models.items():
                if label not in labels:
                    problems.append(f"overrides[{j}].models.{label}: no model named {label!r}")
                check(values, f"overrides[{j}].models.{label}", True)
        if method.check_recipe is not None:
            problems.extend(method.check_recipe(self))
        if self.files_from not in (None, "base", *labels):
            problems.append(f"files_from: {self.files_from!r} is neither 'base' nor a model name")
        if problems:
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Build and validate a Recipe from a parsed YAML mapping (amalgam or mergekit)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping at the top level")
    if "merge_method" in data:
        from amalgam.mergekit_compat import translate

        data = translate(data, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "recipe"
            lines.append(f"{loc}: {err['msg']}")
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None
    try:
        recipe.validate_method()
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file (an amalgam recipe or a mergekit config, detected by its keys).

    ``${VAR}`` in the file is replaced from the environment; relative paths are relative to the
    working directory.
    """
    p = Path(path)
    try:
        text = os.path.expandvars(p.read_text())
    except OSError as exc:
        raise RecipeError(f"{p}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p}: not valid YAML ({exc})") from None
    return parse_recipe(data, str(p))
