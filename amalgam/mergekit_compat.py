"""Translate a mergekit YAML config (mergekit 0.1.5 semantics) into an amalgam recipe mapping.

Supported: ``merge_method`` linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, slerp, model_stock, della, della_linear, sce, nuslerp, multislerp, karcher,
passthrough, nearswap, arcee_fusion, ram and ramplus_tl; ``slices``
(:mod:`amalgam.mergekit_slices`); ``models`` (each ``model`` with ``parameters``),
``base_model``, top-level ``parameters``, ``dtype``/``out_dtype``, gradients (lists of numbers,
interpolated across layer index) and filter lists (``- filter: self_attn`` ... ``- value: x``).

mergekit resolves a parameter for a tensor by asking, in order, the model's own setting, then
the top-level one; inside a setting, a filter list takes its first entry whose ``filter`` is a
substring of the tensor name (an entry without filter matches everything). amalgam resolves
the opposite way round (later overrides win), so the translation writes, per parameter, from
lowest to highest precedence: the top-level fallback as ``params``, the top-level filters as
overrides in reverse order, then each model's fallback and filters the same way.

mergekit's defaults replace amalgam's wherever they differ (a mergekit config must give
mergekit's math): density defaults to 1 (no sparsification), DARE's rescale is L1-norm
matching (``rescale: l1``), ``normalize`` is on for linear and ties only. ``weight`` (and
slerp's ``t``) have no default in mergekit: a config that leaves them unset is refused, as
mergekit refuses it. ``tokenizer_source`` and the ``tokenizer:`` section (``source``,
``tokens``, ``pad_to_multiple_of``) become ``align: {method: vocab, tokenizer: ...}``
(docs/align-vocab.md; ``kind: model_token`` sources are refused). Everything else
(``modules``, other methods, unknown parameters, ``model@revision`` references,
...) is refused with a RecipeError that names the field and the source file. A ``model+lora``
reference passes through as the model's URI: the merge opens the PEFT adapter over that model
(``amalgam.adapters``).

Known differences that remain (documented, not refused): TIES trim keeps every entry tied with
the threshold magnitude, where mergekit's argsort keeps an arbitrary subset of the ties;
DARE and DELLA masks come from amalgam's counter-based stream (a pure function of seed,
tensor, model and entry index), not mergekit's global generator, so the kept entries differ
while their distribution is the same (DELLA also ranks equal magnitudes by position); sce
keeps every position tied with its variance threshold; model_stock clamps its ratio to [0, 1];
mergekit casts to ``dtype`` before merging, amalgam always computes in float32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from amalgam.errors import RecipeError
from amalgam.mergekit_slices import model_entries, recipe_slices, slice_sources, top_parameters

MERGEKIT_VERSION = "0.1.5"

_MISSING = object()
_TOP_LEVEL = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
}
_REFUSED_TOP_LEVEL = {
    "modules": "per-module definitions are not supported; merge whole models with 'models'",
}
_DTYPES = {"float32", "float16", "bfloat16"}
_BOOL_STRINGS = {
    "true": True,
    "t": True,
    "yes": True,
    "y": True,
    "on": True,
    "1": True,
    "false": False,
    "f": False,
    "no": False,
    "n": False,
    "off": False,
    "0": False,
}


@dataclass(frozen=True)
class _Param:
    """One mergekit parameter and how it maps onto amalgam's.

    ``scope`` is mergekit's: ``shared`` (top level only), ``input`` (every input, base
    included) or ``non_base``. ``target`` is amalgam's parameter name, None for a parameter
    that changes nothing in mergekit's math (accepted, then dropped). ``allowed`` lists the
    only values amalgam can reproduce, when it cannot reproduce all of them.
    """

    name: str
    kind: type
    scope: str
    default: Any = _MISSING
    target: str | None = None
    convert: Callable[[Any], Any] | None = None
    allowed: tuple[Any, ...] | None = None
    why_not: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@dataclass(frozen=True)
class _Method:
    """A mergekit method: its parameters, base policy, input counts and fixed amalgam params."""

    name: str
    params: tuple[_Param, ...]
    base: str  # "required", "optional", or "input" (a base_model is merged like any model)
    min_non_base: int = 1
    max_non_base: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> _Param | None:
        return next((p for p in self.params if p.name == name), None)


def _gta(
    name: str,
    *,
    normalize: bool,
    rescale: bool,
    sparsify: str | None,
    consensus: bool,
) -> _Method:
    """mergekit's generalized task arithmetic family (task_arithmetic, ties, dare, breadcrumbs)."""
    if sparsify in ("random", "della"):  # amalgam's drops take mergekit's L1 rescale
        rescale_param = _Param(
            "rescale",
            bool,
            "shared",
            rescale,
            target="rescale",
            convert=lambda v: "l1" if v else "none",
        )
    elif sparsify is None:
        rescale_param = _Param("rescale", bool, "shared", rescale)  # no sparsifier: no effect
    else:
        rescale_param = _Param(
            "rescale",
            bool,
            "shared",
            rescale,
            allowed=(False,),
            why_not=f"L1 rescaling after the {name} trim is not implemented by amalgam",
        )
    params = [
        _Param("int8_mask", bool, "shared", False),  # mask storage only
        _Param("normalize", bool, "shared", normalize, target="normalize"),
        rescale_param,
        _Param("lambda", float, "shared", 1.0, target="lambda"),
        _Param("weight", float, "non_base", target="weight"),
        _Param("density", float, "non_base", 1.0, target="density" if sparsify else None),
    ]
    if sparsify == "outliers":
        params.append(_Param("gamma", float, "non_base", 0.01, target="gamma"))
    if sparsify == "della":
        params.append(_Param("epsilon", float, "non_base", 0.15, target="epsilon"))
    return _Method(name, tuple(params), "required", fixed={"consensus": "sum"} if consensus else {})


METHODS: dict[str, _Method] = {
    m.name: m
    for m in (
        _Method(
            "linear",
            (
                _Param("weight", float, "input", target="weight"),
                _Param("normalize", bool, "shared", True, target="normalize"),
            ),
            "input",
        ),
        _gta("task_arithmetic", normalize=False, rescale=False, sparsify=None, consensus=False),
        _gta("ties", normalize=True, rescale=False, sparsify="magnitude", consensus=True),
        _gta("dare_linear", normalize=False, rescale=True, sparsify="random", consensus=False),
        _gta("dare_ties", normalize=False, rescale=True, sparsify="random", consensus=True),
        _gta("breadcrumbs", normalize=False, rescale=False, sparsify="outliers", consensus=False),
        _gta(
            "breadcrumbs_ties", normalize=False, rescale=False, sparsify="outliers", consensus=True
        ),
        _Method(
            "slerp", (_Param("t", float, "shared", target="t"),), "required", 1, max_non_base=1
        ),
        _Method(
            "passthrough",
            (
                _Param(
                    "scale",
                    float,
                    "shared",
                    1.0,
                    target="scale",
                    why_not="amalgam's passthrough takes one scale at the top level "
                    "(per tensor by filters)",
                ),
            ),
            "input",
        ),
        _Method(
            "nearswap", (_Param("t", float, "shared", target="t"),), "required", 1, max_non_base=1
        ),
        _Method("arcee_fusion", (), "required", 1, max_non_base=1),
        _Method("ram", (_Param("epsilon", float, "shared", 1e-5, target="epsilon"),), "required"),
        _Method(
            "ramplus_tl",
            (
                _Param("epsilon", float, "shared", 1e-5, target="epsilon"),
                _Param("r", float, "shared", 0.1, target="r"),
                _Param("alpha", float, "shared", 0.2, target="alpha"),
            ),
            "required",
        ),
        _Method(
            "model_stock",
            (_Param("filter_wise", bool, "shared", False, target="filter_wise"),),
            "required",
            min_non_base=2,
        ),
        _gta("della", normalize=True, rescale=True, sparsify="della", consensus=True),
        _gta("della_linear", normalize=False, rescale=True, sparsify="della", consensus=False),
        _Method(
            "sce",
            (
                _Param("int8_mask", bool, "shared", False),  # mask storage only
                _Param("select_topk", float, "shared", 1.0, target="select_topk"),
            ),
            "required",
        ),
        _Method(
            "nuslerp",
            (
                _Param("weight", float, "non_base", target="weight"),
                _Param("nuslerp_flatten", bool, "shared", True, target="flatten"),
                _Param("nuslerp_row_wise", bool, "shared", False, target="row_wise"),
            ),
            "optional",
            min_non_base=2,
            max_non_base=2,
        ),
        _Method(
            "multislerp",
            (
                _Param("weight", float, "non_base", target="weight"),
                _Param("normalize_weights", bool, "shared", True, target="normalize_weights"),
                _Param("eps", float, "shared", 1e-8, target="eps"),
            ),
            "optional",
        ),
        _Method(
            "karcher",
            (
                _Param("max_iter", int, "shared", 10, target="max_iter", convert=int),
                _Param("tol", float, "shared", 1e-5, target="tol"),
            ),
            "input",
        ),
    )
}

# One resolved setting: (substring filter or None for "any tensor", value), in mergekit order,
# cut after the first entry without filter (mergekit never looks further).
Setting = list[tuple[str | None, Any]]


class _Refuse:
    """Builds RecipeErrors that name the source file and the mergekit field."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, where: str, message: str) -> RecipeError:
        return RecipeError(f"{self.source}: {where}: {message} (mergekit config)")


@dataclass
class _Input:
    """One model merged by the recipe: its path, its mergekit field and its settings."""

    path: str
    where: str
    raw: dict[str, Any]
    settings: dict[str, Setting] = field(default_factory=dict)
    label: str = ""


def translate(data: dict, source: str = "recipe") -> dict:
    """An amalgam recipe mapping equivalent to the mergekit config ``data`` (from ``source``)."""
    refuse = _Refuse(source)
    for key in data:
        if key in _REFUSED_TOP_LEVEL:
            raise refuse(key, _REFUSED_TOP_LEVEL[key])
        if key not in _TOP_LEVEL:
            supported = ", ".join(sorted(_TOP_LEVEL))
            raise refuse(key, f"unknown or unsupported key (supported: {supported})")
    name = data.get("merge_method")
    if name not in METHODS:
        supported = ", ".join(sorted(METHODS))
        raise refuse("merge_method", f"{name!r} is not supported (supported: {supported})")
    method = METHODS[name]
    base_path = None
    if data.get("base_model") is not None:
        base_path = _model_path(data["base_model"], "base_model", refuse)
    if method.base == "required" and base_path is None:
        raise refuse("base_model", f"mergekit's '{name}' needs a base_model")

    slices = slice_sources(data, refuse) if "slices" in data else None
    entries, wheres = data.get("models"), None
    if slices is not None:
        entries, wheres = model_entries(slices, refuse)
        data = {**data, "parameters": top_parameters(data)}
        if name == "passthrough" and base_path not in (None, slices[0][0].path):
            raise refuse(
                "base_model", "a stacked model's config comes from its first slice's model"
            )
    # with slices, mergekit merges the sources only: an unlisted base_model is no input
    listed_base = base_path if slices is None or method.base == "required" else None
    inputs = _inputs(entries, method, listed_base, refuse, wheres)
    sources = {inp.path for inp in inputs}
    if slices is not None and method.base == "input" and base_path not in (None, *sources):
        raise refuse("base_model", "with slices, the base_model must be one of the sources")
    for inp, label in zip(inputs, _labels([i.path for i in inputs]), strict=True):
        inp.label = label
        for key, setting in inp.raw.items():
            at = f"{inp.where}.parameters.{key}"
            inp.settings[key] = _setting(
                _param_for(method, key, at, refuse, per_model=True), setting, at, refuse
            )
    top = data.get("parameters") or {}
    if not isinstance(top, dict):
        raise refuse("parameters", "expected a mapping of parameter settings")
    top_settings = {
        key: _setting(
            _param_for(method, key, f"parameters.{key}", refuse, per_model=False),
            setting,
            f"parameters.{key}",
            refuse,
        )
        for key, setting in top.items()
    }
    _check_required(method, top_settings, inputs, refuse)
    if name.startswith("breadcrumbs"):
        _breadcrumbs_density(top_settings, inputs, refuse)

    recipe: dict[str, Any] = {"method": name, **_emit(method, top_settings, inputs)}
    if method.base != "input" and base_path is not None:
        recipe["base"] = base_path
    dtype = _dtype(data, refuse)
    if dtype is not None:
        recipe["dtype"] = dtype
    if slices is not None:
        labels = {inp.path: inp.label for inp in inputs}
        if method.base == "required":
            labels[base_path] = "base"
        recipe["slices"] = recipe_slices(slices, labels)
    files_from = _files_from(data, method, base_path, inputs, refuse)
    if name == "passthrough":
        files_from = None  # the first slice's (or the single model's) config
    if files_from is not None:
        recipe["files_from"] = files_from
    tokenizer = _tokenizer(data, files_from, base_path, inputs, refuse)
    if tokenizer is not None:
        recipe["align"] = {"method": "vocab", "tokenizer": tokenizer}
    return recipe


def _inputs(
    entries: Any,
    method: _Method,
    base_path: str | None,
    refuse: _Refuse,
    wheres: list[str] | None = None,
) -> list[_Input]:
    """The models amalgam merges, in mergekit's order, base handled as mergekit does
    (``wheres``: the field each entry came from, when not ``models[i]``)."""
    if not isinstance(entries, list) or not entries:
        raise refuse("models", "expected a non-empty list of '- model: PATH' entries")
    inputs: list[_Input] = []
    seen: set[str] = set()
    base_listed = False
    for i, entry in enumerate(entries):
        where = wheres[i] if wheres else f"models[{i}]"
        if not isinstance(entry, dict):
            raise refuse(where, "expected a mapping with 'model' and optional 'parameters'")
        for key in entry:
            if key not in ("model", "parameters"):
                raise refuse(f"{where}.{key}", "unknown key (expected 'model', 'parameters')")
        path = _model_path(entry.get("model"), f"{where}.model", refuse)
        if path in seen:
            raise refuse(f"{where}.model", f"{path!r} is listed twice")
        seen.add(path)
        raw = entry.get("parameters") or {}
        if not isinstance(raw, dict):
            raise refuse(f"{where}.parameters", "expected a mapping of parameter settings")
        if path == base_path:
            base_listed = True
            if method.base != "input":
                # mergekit reads nothing from the base's own parameters (they are all
                # non-base or shared): check them, then drop the entry.
                for key, setting in raw.items():
                    at = f"{where}.parameters.{key}"
                    param = _param_for(method, key, at, refuse, per_model=True)
                    _setting(param, setting, at, refuse)
                continue
        inputs.append(_Input(path, where, raw))
    if method.base == "input" and base_path is not None and not base_listed:
        # mergekit 0.1.5 merges an unlisted base_model like any other input, with the
        # top-level parameter values.
        inputs.append(_Input(base_path, "base_model", {}))
    n = len(inputs)
    if n < method.min_non_base or (method.max_non_base is not None and n > method.max_non_base):
        want = (
            f"exactly {method.min_non_base}"
            if method.min_non_base == method.max_non_base
            else f"at least {method.min_non_base}"
        )
        what = {
            "required": "model besides the base_model",
            "optional": "models besides any base_model",
        }.get(method.base, "models")
        raise refuse("models", f"mergekit's '{method.name}' takes {want} {what}; got {n}")
    return inputs


def _check_required(
    method: _Method, top: dict[str, Setting], inputs: list[_Input], refuse: _Refuse
) -> None:
    """mergekit has no default for weight (and slerp's t): every tensor must get a value."""
    for param in (p for p in method.params if p.required):
        if _has_fallback(top.get(param.name)):
            continue
        if param.scope == "shared":
            raise refuse(f"parameters.{param.name}", _no_default(param.name, "every tensor"))
        for inp in inputs:
            if not _has_fallback(inp.settings.get(param.name)):
                raise refuse(
                    f"{inp.where}.parameters.{param.name}",
                    _no_default(param.name, f"every tensor of '{inp.label}'"),
                )


def _emit(method: _Method, top: dict[str, Setting], inputs: list[_Input]) -> dict[str, Any]:
    """params, models and overrides, written lowest precedence first (later overrides win)."""
    params: dict[str, Any] = dict(method.fixed)
    model_params: list[dict[str, Any]] = [{} for _ in inputs]
    overrides: list[dict[str, Any]] = []
    for param in method.params:
        target = param.target
        if target is None:
            continue
        if not param.required:
            params[target] = _convert(param, param.default)
        fallback, filters = _split(top.get(param.name))
        if fallback is not _MISSING:
            params[target] = _convert(param, fallback)
        for f, v in reversed(filters):
            overrides.append({"match": re.escape(f), "params": {target: _convert(param, v)}})
        for inp, values in zip(inputs, model_params, strict=True):
            own, own_filters = _split(inp.settings.get(param.name))
            if own is not _MISSING:
                if filters:  # a model's own value beats every top-level filter in mergekit
                    value = _convert(param, own)
                    overrides.append({"match": "", "models": {inp.label: {target: value}}})
                else:
                    values[target] = _convert(param, own)
            for f, v in reversed(own_filters):
                overrides.append(
                    {"match": re.escape(f), "models": {inp.label: {target: _convert(param, v)}}}
                )
    models = [
        {"uri": inp.path, "name": inp.label, "params": values}
        for inp, values in zip(inputs, model_params, strict=True)
    ]
    return {"models": models, "params": params, "overrides": overrides}


def _split(setting: Setting | None) -> tuple[Any, list[tuple[str, Any]]]:
    """(value for tensors no filter matches, or _MISSING; the filtered entries in order)."""
    fallback: Any = _MISSING
    filters: list[tuple[str, Any]] = []
    for f, v in setting or []:
        if f is None:
            fallback = v
        else:
            filters.append((f, v))
    return fallback, filters


# -- pieces --------------------------------------------------------------------------------------


def _model_path(ref: Any, where: str, refuse: _Refuse) -> str:
    if isinstance(ref, dict):
        raise refuse(
            where, "structured model references (lora, override_architecture) are not supported"
        )
    if not isinstance(ref, str) or not ref.strip():
        raise refuse(where, f"expected a model path, got {ref!r}")
    if "@" in ref:
        raise refuse(
            where,
            f"{ref!r}: revisions (model@revision) are not supported; "
            "point at a local folder or a storage URI",
        )
    return ref


def _labels(paths: list[str]) -> list[str]:
    """Distinct, safe model names from the paths' last components ('base' stays reserved)."""
    labels: list[str] = []
    for path in paths:
        stem = PurePosixPath(path.rstrip("/")).name or "model"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
        label, k = stem, 1
        while label in labels or label == "base":
            k += 1
            label = f"{stem}-{k}"
        labels.append(label)
    return labels


def _param_for(
    method: _Method, key: Any, where: str, refuse: _Refuse, *, per_model: bool
) -> _Param:
    param = method.param(key) if isinstance(key, str) else None
    if param is None:
        known = ", ".join(p.name for p in method.params)
        raise refuse(where, f"unknown parameter for mergekit's '{method.name}' (known: {known})")
    if per_model and param.scope == "shared":
        raise refuse(
            where,
            param.why_not
            or f"'{key}' is a shared parameter (mergekit ignores a per-model value); "
            "set it under the top-level parameters",
        )
    return param


def _setting(param: _Param, setting: Any, where: str, refuse: _Refuse) -> Setting:
    """A mergekit setting as (filter, value) entries, values checked and coerced like mergekit."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        out: Setting = []
        for j, cond in enumerate(setting):
            for key in cond:
                if key not in ("filter", "value"):
                    raise refuse(f"{where}[{j}].{key}", "unknown key (expected 'filter', 'value')")
            if "value" not in cond:
                raise refuse(f"{where}[{j}]", "a filter entry needs a 'value'")
            filt = cond.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise refuse(f"{where}[{j}].filter", f"expected a string, got {filt!r}")
            if isinstance(cond["value"], dict | list) and any(
                isinstance(v, dict) for v in _as_list(cond["value"])
            ):
                raise refuse(f"{where}[{j}].value", "expected a value or a list of values")
            value = _value(param, cond["value"], f"{where}[{j}].value", refuse)
            if filt in (None, "", "*"):
                out.append((None, value))
                break  # mergekit never reads past an entry that matches every tensor
            out.append((filt, value))
        return out
    return [(None, _value(param, setting, where, refuse))]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _value(param: _Param, value: Any, where: str, refuse: _Refuse) -> Any:
    if isinstance(value, list):
        if not value:
            raise refuse(where, "an empty list is not a value")
        if param.kind is bool:
            raise refuse(where, f"'{param.name}' is true/false; a gradient list is not supported")
        return [_scalar(param, v, f"{where}[{k}]", refuse) for k, v in enumerate(value)]
    return _scalar(param, value, where, refuse)


def _scalar(param: _Param, value: Any, where: str, refuse: _Refuse) -> Any:
    if param.kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        elif isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            out = _BOOL_STRINGS[value.strip().lower()]
        else:
            raise refuse(where, f"expected true/false, got {value!r}")
        if param.allowed is not None and out not in param.allowed:
            raise refuse(
                where, f"{param.name}: {str(out).lower()} is not supported: {param.why_not}"
            )
        return out
    if isinstance(value, bool):
        raise refuse(where, f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        if param.kind is int and not float(value).is_integer():
            raise refuse(where, f"expected an integer, got {value!r}")
        return float(value)
    if isinstance(value, str):  # YAML reads 1e-3 as a string; mergekit parses it as a number
        try:
            return float(value)
        except ValueError:
            pass
    raise refuse(where, f"expected a number, got {value!r}")


def _no_default(name: str, what: str) -> str:
    return (
        f"mergekit requires '{name}' for {what} and has no default: give a value "
        "(or a filter list that ends in an entry without filter)"
    )


def _convert(param: _Param, value: Any) -> Any:
    return param.convert(value) if param.convert else value


def _has_fallback(setting: Setting | None) -> bool:
    return bool(setting) and any(f is None for f, _ in setting)


def _values(setting: Setting | None) -> list[float]:
    out: list[float] = []
    for _, v in setting or []:
        out.extend(v if isinstance(v, list) else [v])
    return out


def _breadcrumbs_density(top: dict[str, Setting], inputs: list[_Input], refuse: _Refuse) -> None:
    """Refuse density settings whose mergekit meaning amalgam's breadcrumbs cannot reproduce.

    mergekit skips sparsification entirely where density >= 1 (its default), and where
    density + gamma > 1 it shrinks the outlier cut instead of the kept band. With no density
    anywhere the merge is plain task arithmetic: density 1 and gamma 0 reproduce that.
    """
    densities = _values(top.get("density"))
    gammas = _values(top.get("gamma"))
    for inp in inputs:
        densities += _values(inp.settings.get("density"))
        gammas += _values(inp.settings.get("gamma"))
    if not densities:
        top["density"] = [(None, 1.0)]
        top["gamma"] = [(None, 0.0)]
        for inp in inputs:
            inp.settings.pop("gamma", None)
        return
    for inp in inputs:
        if not (_has_fallback(inp.settings.get("density")) or _has_fallback(top.get("density"))):
            raise refuse(
                f"{inp.where}.parameters.density",
                f"'{inp.label}' has no density for some tensors, where mergekit's default 1 "
                "disables outlier removal; give every model a density below 1",
            )
        if not (_has_fallback(inp.settings.get("gamma")) or _has_fallback(top.get("gamma"))):
            gammas.append(0.01)  # mergekit's default gamma reaches some of its tensors
    if max(densities) >= 1:
        raise refuse(
            "density",
            "density >= 1 disables mergekit's breadcrumbs outlier removal, which amalgam's "
            "breadcrumbs always applies; use a density below 1 or task_arithmetic",
        )
    if max(densities) + max(gammas, default=0.0) > 1:
        raise refuse(
            "gamma",
            "density + gamma > 1: mergekit then removes fewer outliers, amalgam keeps fewer "
            "entries; choose density + gamma <= 1",
        )


def _dtype(data: dict, refuse: _Refuse) -> str | None:
    """The output dtype: ``out_dtype``, else ``dtype`` (amalgam always computes in float32)."""
    names = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is None:
            continue
        name = value.removeprefix("torch.") if isinstance(value, str) else value
        if name not in _DTYPES:
            supported = ", ".join(sorted(_DTYPES))
            raise refuse(key, f"{value!r} is not supported (supported: {supported})")
        names[key] = name
    return names.get("out_dtype") or names.get("dtype")


def _files_from(
    data: dict, method: _Method, base_path: str | None, inputs: list[_Input], refuse: _Refuse
) -> str | None:
    """Where config and tokenizer come from: mergekit copies them from the base_model."""
    if data.get("chat_template") is not None:
        raise refuse("chat_template", "setting a chat template is not supported")
    if base_path is None:
        return None
    if method.base != "input":
        return "base"
    return next(inp.label for inp in inputs if inp.path == base_path)


def _tokenizer(
    data: dict, files_from: str | None, base_path: str | None, inputs: list[_Input], refuse: _Refuse
) -> dict[str, Any] | None:
    """``tokenizer_source`` or the ``tokenizer:`` section as amalgam's ``align.tokenizer``
    (``align.method: vocab``); None when the config has neither. mergekit's ``base`` is the
    base_model (else the first model); a model is named by its path (``model:`` optional)."""
    legacy, section = data.get("tokenizer_source"), data.get("tokenizer")
    if legacy is not None and section is not None:
        raise refuse("tokenizer", "give tokenizer_source or a tokenizer section, not both")
    # files_from names the base_model when the recipe takes it as one of its models
    base = "base" if files_from in (None, "base") else f"model:{files_from}"

    def model(value: Any, where: str) -> str:
        if value == "base" or (
            base_path is not None and value in (base_path, f"model:{base_path}")
        ):
            return base
        path = value.removeprefix("model:") if isinstance(value, str) else None
        label = next((inp.label for inp in inputs if inp.path == path), None)
        if label is None:
            raise refuse(where, f"{value!r} is not 'base' or one of the models")
        return f"model:{label}"

    out: dict[str, Any] = {"special_tokens": base, "allow_remap": True}
    if section is not None:
        if not isinstance(section, dict):
            raise refuse("tokenizer", "expected a mapping")
        for key in section:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                supported = "source, tokens, pad_to_multiple_of"
                raise refuse(f"tokenizer.{key}", f"is not supported (tokenizer: {supported})")
        legacy = section.get("source", "union")
        out["tokens"] = _token_rows(section.get("tokens") or {}, model, refuse)
        if section.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = section["pad_to_multiple_of"]
    if legacy is None:
        return None
    field = "tokenizer.source" if section is not None else "tokenizer_source"
    # mergekit remaps rows by token whatever their ids, and takes special tokens from the base
    return {"source": "union" if legacy == "union" else model(legacy, field), **out}


def _token_rows(
    tokens: Any, model: Callable[[Any, str], str], refuse: _Refuse
) -> dict[str, dict[str, Any]]:
    """mergekit's ``tokenizer.tokens`` as ``align.tokenizer.tokens``: a source model or
    ``{kind: zero}``, and ``force``."""
    if not isinstance(tokens, dict):
        raise refuse("tokenizer.tokens", "expected a mapping of token -> settings")
    out = {}
    for token, settings in tokens.items():
        where = f"tokenizer.tokens.{token}"
        if not isinstance(settings, dict) or set(settings) - {"source", "force"}:
            raise refuse(where, "expected {source: <model> | {kind: zero}, force: <bool>}")
        source = settings.get("source")
        if isinstance(source, dict):
            if source != {"kind": "zero"}:
                raise refuse(f"{where}.source", "only a model or {kind: zero} is supported")
            row = "zero"
        else:
            row = model(source, f"{where}.source")
        out[str(token)] = {"source": row, "force": bool(settings.get("force", False))}
    return out
