"""PEFT LoRA adapters: read and check ``adapter_config.json``, and PEFT's tensor key naming.

Conventions are PEFT's (``peft.tuners.lora``): an adapter tensor is stored as
``base_model.model.<module>.<part>`` (``lora_A.weight`` r x in, ``lora_B.weight`` out x r,
``lora_embedding_A`` r x vocab, ``lora_embedding_B`` hidden x r, DoRA's
``lora_magnitude_vector``); any other key is a whole tensor (``modules_to_save``, or an
embedding's ``base_layer`` saved with the adapter). A module's rank and alpha come from the
first ``rank_pattern`` / ``alpha_pattern`` key that matches the end of its name (at a dot),
else ``r`` / ``lora_alpha``; its scale is alpha / r, or alpha / sqrt(r) with ``use_rslora``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from amalgam.errors import CheckpointError

PEFT_PREFIX = "base_model.model."
LORA_PARTS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
# Config fields that change what a merge must compute and that this reader does not implement.
UNSUPPORTED = {
    "lora_bias": "a LoRA bias (lora_B.bias)",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters rather than modules",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which PEFT cannot merge either",
    "use_qalora": "QA-LoRA's grouped inputs",
    "use_bdlora": "block-diagonal LoRA",
}


def peft_key(module: str, part: str) -> str:
    """PEFT's stored name of ``part`` (a LORA_PARTS entry, or ``weight`` / ``bias`` of a whole
    module) of base-model module ``module``: ``base_model.model.<module>.<part>``."""
    return f"{PEFT_PREFIX}{module}.{part}"


def split_peft_key(key: str) -> tuple[str, str] | None:
    """(module, LoRA part) of a stored LoRA key; None for a whole tensor's key."""
    body = key.removeprefix(PEFT_PREFIX)
    for part in LORA_PARTS:
        if body.endswith("." + part):
            return body[: -len(part) - 1], part
    return None


def base_tensor_name(key: str) -> str:
    """The base model's name of a whole tensor stored in an adapter (``modules_to_save``, or a
    ``base_layer`` saved with it): the PEFT prefix and ``base_layer.`` removed."""
    return key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first pattern that matches ``module`` as PEFT matches rank/alpha patterns: the
    pattern (a regex) ends the name, at its start or after a dot."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoRA ``adapter_config.json`` that decide a merge."""

    source: str  # where it was read, for messages
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def rank(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale(self, module: str) -> float:
        """PEFT's scaling of ``module``'s ``B @ A``."""
        r, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` names ``module`` (a list: the name or its last parts; a
        string: a regex of the whole name; ``all-linear`` or none given: any module)."""
        t = self.target_modules
        if t is None or t == "all-linear":
            return True
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == x or module.endswith("." + x) for x in t)

    def unmatched_patterns(self, modules: Iterable[str]) -> list[str]:
        """rank_pattern / alpha_pattern entries that match none of ``modules``."""
        modules = list(modules)
        out = []
        for name, patterns in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            for key in patterns:
                if not any(pattern_key([key], m) for m in modules):
                    out.append(f"{name} entry {key!r}")
        return out


def parse_adapter_config(data: Mapping[str, Any], source: str) -> AdapterConfig:
    """Check a parsed ``adapter_config.json``; one :class:`CheckpointError` names ``source``
    and every bad field."""
    problems: list[str] = []
    if data.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {data.get('peft_type')!r} (only LORA adapters merge)")
    for key, what in UNSUPPORTED.items():
        if data.get(key):
            problems.append(f"{key}: {what} is not supported")

    def number(key: str, default: Any, integer: bool) -> Any:
        value = data.get(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            problems.append(
                f"{key}: expected a positive {'integer' if integer else 'number'}, got {value!r}"
            )
            return default
        return value

    def flag(key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
            return False
        return value

    def pattern(key: str, integer: bool) -> dict:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of module patterns, got {value!r}")
            return {}
        out = {}
        for k, v in value.items():
            ok = (
                isinstance(v, int if integer else (int, float))
                and not isinstance(v, bool)
                and v > 0
            )
            if not ok:
                problems.append(f"{key}.{k}: expected a positive number, got {v!r}")
                continue
            try:
                re.compile(k)
            except re.error as exc:
                problems.append(f"{key}.{k}: not a valid pattern ({exc})")
                continue
            out[k] = v
        return out

    targets = data.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif targets is not None and not isinstance(targets, str):
        problems.append(f"target_modules: expected a list of names or a regex, got {targets!r}")
        targets = None
    saved = data.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        problems.append(f"modules_to_save: expected a list of module names, got {saved!r}")
        saved = []
    base = data.get("base_model_name_or_path")
    config = AdapterConfig(
        source=source,
        r=number("r", 8, True),
        lora_alpha=number("lora_alpha", 8, False),
        target_modules=targets,
        use_rslora=flag("use_rslora"),
        fan_in_fan_out=flag("fan_in_fan_out"),
        modules_to_save=tuple(saved),
        use_dora=flag("use_dora"),
        rank_pattern=pattern("rank_pattern", True),
        alpha_pattern=pattern("alpha_pattern", False),
        base_model_name_or_path=base if isinstance(base, str) and base else None,
    )
    if problems:
        raise CheckpointError(f"{source}: invalid adapter config: " + "; ".join(problems))
    return config
