"""Which base tensor each adapter tensor changes, checked against the base's tensor table
(names and shapes only; reads no tensor)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from amalgam.adapters.peft_config import AdapterConfig, base_tensor_name, split_peft_key
from amalgam.checkpoint import TensorInfo
from amalgam.errors import PlanError

MAX_SHOWN = 5  # problems named in the one error line before "and N more"


@dataclass(frozen=True)
class Patch:
    """One base tensor's change: ``W0 + scale * B @ A`` (``B @ A`` transposed first when
    ``transpose``: ``fan_in_fan_out`` layers and embeddings), then DoRA's per-row rescale
    when ``magnitude`` names the magnitude vector. Fields are adapter tensor names."""

    a: str
    b: str
    scale: float
    transpose: bool
    magnitude: str | None = None


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter over a base: ``patches`` and ``whole`` (tensors the adapter replaces:
    ``modules_to_save``), both keyed by the base tensor's name."""

    config: AdapterConfig
    patches: dict[str, Patch]
    whole: dict[str, str]


def adapter_layout(
    config: AdapterConfig,
    adapter: Mapping[str, TensorInfo],
    base: Mapping[str, TensorInfo],
    where: str,
) -> AdapterLayout:
    """Map ``adapter``'s tensors onto ``base``'s; one :class:`PlanError` (naming ``where``, the
    adapter) lists every tensor that does not fit."""
    problems: list[str] = []
    modules: dict[str, dict[str, TensorInfo]] = {}
    whole: dict[str, str] = {}
    for key, info in adapter.items():
        split = split_peft_key(key)
        if split is None:
            name = base_tensor_name(key)
            if name not in base:
                problems.append(f"'{key}' has no tensor '{name}' in the base")
            elif base[name].shape != info.shape:
                problems.append(
                    f"'{key}' has shape {list(info.shape)} but the base's '{name}' has "
                    f"{list(base[name].shape)}"
                )
            else:
                whole[name] = key
            continue
        module, part = split
        modules.setdefault(module, {})[part] = info
    patches = {}
    for module, parts in sorted(modules.items()):
        patch = _patch(config, module, parts, base, problems)
        if patch is not None:
            patches[f"{module}.weight"] = patch
    problems += [f"{p} matches no module" for p in config.unmatched_patterns(modules)]
    if problems:
        shown = problems[:MAX_SHOWN]
        more = f"; and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise PlanError(f"adapter {where} does not fit its base: " + "; ".join(shown) + more)
    return AdapterLayout(config, patches, whole)


def _patch(
    config: AdapterConfig,
    module: str,
    parts: dict[str, TensorInfo],
    base: Mapping[str, TensorInfo],
    problems: list[str],
) -> Patch | None:
    """``module``'s patch, or None after adding what is wrong with it to ``problems``."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_part, b_part = (
        ("lora_embedding_A", "lora_embedding_B")
        if embedding
        else ("lora_A.weight", "lora_B.weight")
    )
    missing = [p for p in (a_part, b_part) if p not in parts]
    if missing:
        problems.append(f"module '{module}' lacks {', '.join(missing)}")
        return None
    a, b = parts[a_part], parts[b_part]
    magnitude = parts.get("lora_magnitude_vector")
    name = f"{module}.weight"
    before = len(problems)
    if not config.targets(module):
        problems.append(f"module '{module}' is not among target_modules {config.target_modules}")
    if magnitude is not None and not config.use_dora:
        problems.append(f"module '{module}' has a DoRA magnitude vector but use_dora is false")
    if magnitude is None and config.use_dora:
        problems.append(f"module '{module}' has no DoRA magnitude vector (use_dora is true)")
    if magnitude is not None and embedding:
        problems.append(f"module '{module}': DoRA on an embedding is not supported")
    if name not in base:
        problems.append(f"module '{module}' has no tensor '{name}' in the base")
        return None
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        problems.append(
            f"module '{module}': {a_part} {list(a.shape)} and {b_part} {list(b.shape)} "
            "are not a rank-r pair"
        )
        return None
    rank = config.rank(module)
    if a.shape[0] != rank:
        problems.append(f"module '{module}' has rank {a.shape[0]} but its config gives r={rank}")
    transpose = embedding or config.fan_in_fan_out
    delta = (b.shape[0], a.shape[1])
    delta = delta[::-1] if transpose else delta
    if tuple(base[name].shape) != delta:
        problems.append(
            f"module '{module}': {b_part} @ {a_part} is {list(delta)} but the base's '{name}' "
            f"is {list(base[name].shape)}"
        )
    if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
        problems.append(
            f"module '{module}': lora_magnitude_vector {list(magnitude.shape)} does not fit "
            f"{b.shape[0]} output rows"
        )
    if len(problems) > before:
        return None
    return Patch(
        a.name,
        b.name,
        config.scale(module),
        transpose,
        magnitude.name if magnitude is not None else None,
    )
