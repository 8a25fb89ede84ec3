"""What each tensor of a PEFT LoRA adapter is compressed against.

An adapter has no base copy of its own tensors, so ComPEFT takes each one as a task vector
against a reference:

- LoRA factors (``lora_A``, ``lora_B``, their embedding forms, ``lora_B.bias``) against zero:
  a factor is already a difference from the base, and a ternary factor keeps the adapter a
  small, loadable adapter (compressing ``B @ A`` instead would give a dense update);
- tensors saved whole (``modules_to_save``) against the base's tensor of the same module when
  a base is given and holds it, else against zero;
- DoRA magnitude vectors are stored as they are (a norm per output row, not a difference).

When a base is given, every factor must fit the weight it adapts (``lora_A`` is r x in,
``lora_B`` is out x r) and every whole tensor the base's tensor, or the compression is refused.
"""

from __future__ import annotations

import re

from amalgam.checkpoint import Checkpoint
from amalgam.compress.errors import CompressError

PREFIX = "base_model.model."
FACTOR = re.compile(r"\.lora_(?:embedding_)?([AB])(?:\.weight|\.bias)?$")
KEEP_DENSE = re.compile(r"\.lora_magnitude_vector(?:\.weight)?$")


def base_name(key: str) -> str:
    """The base model's name for an adapter key: PEFT's ``base_model.model.`` removed."""
    return key.removeprefix(PREFIX)


def references(adapter: Checkpoint, base: Checkpoint | None) -> dict[str, str | None]:
    """For each compressible adapter tensor, the base tensor its task vector is taken against
    (None: zero). DoRA magnitudes and non-float tensors are left out (stored as they are).
    Raises :class:`CompressError` naming the tensor when the base does not fit."""
    refs: dict[str, str | None] = {}
    for key, info in adapter.tensors.items():
        if not info.is_float or KEEP_DENSE.search(key):
            continue
        factor = FACTOR.search(key)
        if factor is not None:
            if base is not None:
                _check_factor(adapter, base, key, factor)
            refs[key] = None
            continue
        name = base_name(key)
        if base is None or name not in base.tensors:
            refs[key] = None
        elif base.shape(name) != info.shape:
            raise CompressError(
                f"{adapter.uri}: tensor '{key}' has shape {list(info.shape)} but the base "
                f"{base.uri} holds '{name}' as {list(base.shape(name))}"
            )
        else:
            refs[key] = name
    return refs


#: (adapter axis, base weight axis) that must agree, per LoRA factor kind; a base weight is
#: out x in for a linear layer (in x out with ``fan_in_fan_out``), num x dim for an embedding.
_AXES = {"A": (1, 1), "B": (0, 0), "bias": (0, 0), "embedding_A": (1, 0), "embedding_B": (0, 1)}


def _check_factor(adapter: Checkpoint, base: Checkpoint, key: str, factor: re.Match) -> None:
    """``key`` (a LoRA factor) fits the base weight of its module, which must exist."""
    weight = base_name(key[: factor.start()]) + ".weight"
    if weight not in base.tensors:
        raise CompressError(
            f"{adapter.uri}: tensor '{key}' adapts '{weight}', which the base {base.uri} "
            "does not hold (an adapter of another model?)"
        )
    shape, target = adapter.shape(key), base.shape(weight)
    embedding = "lora_embedding_" in key
    kind = "bias" if key.endswith(".bias") else ("embedding_" if embedding else "") + factor[1]
    mine, theirs = _AXES[kind]
    if not embedding and (adapter.config or {}).get("fan_in_fan_out"):
        theirs = 1 - theirs
    if len(target) == 2 and shape[mine] != target[theirs]:
        raise CompressError(
            f"{adapter.uri}: tensor '{key}' has shape {list(shape)}, which does not fit the "
            f"base's '{weight}' of shape {list(target)} ({base.uri})"
        )
