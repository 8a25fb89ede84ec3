"""What names a statistic: its kind and the settings that change its value (no I/O, no model).

Methods import this to declare the statistics they read; computing them lives in ``compute``.
"""

from __future__ import annotations

from collections.abc import Sequence

from amalgam.errors import StatisticsError

KINDS = ("fisher", "gram")
#: What an artifact may hold: the kinds above, an MoE's routing statistics (MC-SMoE), merge
#: coefficients learned on data (AdaMerging, Concrete) and DAM's learned masks.
ARTIFACT_KINDS = (*KINDS, "routing", "learned", "dam_mask")
#: Fisher targets: the exact expectation over the model's own predictive distribution, draws
#: from it, or the data's own tokens.
VARIANTS = ("exact", "sampled", "empirical")
DEFAULT_VARIANT = "exact"
DEFAULT_SAMPLES = 256  # FusionBench's count for both Fisher and RegMean
DEFAULT_DRAWS = 1  # label draws per example of the ``sampled`` Fisher
# Bumped when a kind's artifacts change content, so older cached artifacts are not reused.
# Gram 2: artifacts also hold the input embedding's token shares.
GRAM_VERSION = 2


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StatisticsError(f"{name}: expected a positive integer, got {value!r}")
    return value


def settings_for(
    kind: str,
    samples: int = DEFAULT_SAMPLES,
    fisher: str = DEFAULT_VARIANT,
    draws: int = DEFAULT_DRAWS,
) -> dict:
    """The settings that change a statistic's value (part of its cache key), checked.
    ``draws`` is part of the key of a ``sampled`` Fisher only."""
    if kind not in KINDS:
        raise StatisticsError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    _positive("samples", samples)
    if kind == "gram":
        return {"samples": samples, "version": GRAM_VERSION}
    if fisher not in VARIANTS:
        raise StatisticsError(f"fisher: expected one of {list(VARIANTS)}, got {fisher!r}")
    if fisher == "sampled":
        return {"samples": samples, "fisher": fisher, "draws": _positive("draws", draws)}
    return {"samples": samples, "fisher": fisher}


def statistic_shape(kind: str, tensor_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """The shape a ``kind`` statistic of ``ndim`` dimensions must have for a tensor of
    ``tensor_shape``: Fisher the tensor's own; Gram (in x in) for a linear layer, or one token
    share per row (a vector) for an input embedding."""
    if kind == "fisher":
        return tuple(tensor_shape)
    return tuple(tensor_shape[:1]) if ndim == 1 else (tensor_shape[-1],) * 2
