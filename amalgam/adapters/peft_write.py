"""Write a PEFT LoRA adapter folder through the checkpoint writer, one tensor at a time.

The folder holds what ``PeftModel.from_pretrained`` reads: ``adapter_model.safetensors`` and
``adapter_config.json``, staged and committed like every amalgam output (commit record last).
Key names follow what PEFT's ``save_pretrained`` writes (checked against peft 0.21): LoRA
factors as ``base_model.model.<module>.lora_A.weight`` (r x in) and ``lora_B.weight``
(out x r), a module saved whole (``modules_to_save``) as ``base_model.model.<module>.<param>``,
without the ``modules_to_save.default`` level the live PeftModel holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from amalgam import storage
from amalgam.checkpoint import DTYPE_NAMES, Checkpoint
from amalgam.writer import CheckpointWriter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of the adapter file: its key, dtype and shape, and how to produce it (called
    once, when its turn to be written comes)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def adapter_config(
    base_model: str | None,
    ranks: dict[str, int],
    target_modules: Sequence[str],
    modules_to_save: Sequence[str] = (),
    *,
    lora_bias: bool = False,
    tie_weights: bool = False,
) -> dict[str, Any]:
    """``adapter_config.json`` for LoRA modules of the given ranks (module name -> r, at least
    one module) at scale 1 (alpha == r everywhere). ``r`` is the most common rank; the others
    go to ``rank_pattern`` and ``alpha_pattern`` under their full module names.
    ``target_modules`` are names PEFT matches as module names or suffixes after a dot: they
    must match exactly the modules of ``ranks``. ``tie_weights``: the saved input embedding and
    output head share one tensor (PEFT's ``ensure_weight_tying``)."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in sorted(ranks.items()) if r != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(target_modules),
        "modules_to_save": sorted(modules_to_save) or None,
        "lora_bias": lora_bias,
        "ensure_weight_tying": tie_weights,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter(
    uri: str,
    config: dict[str, Any],
    tensors: Sequence[AdapterTensor],
    *,
    sources: Iterable[Checkpoint],
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    **storage_options: Any,
) -> str:
    """Write an adapter folder at ``uri``: the tensors in the given order, each produced only
    when written, then the config; committed atomically, nothing left on failure, nor when a
    file of ``sources`` (the checkpoints the tensors are read from) changed since it was
    opened. ``metadata`` goes to the safetensors header (a merge's provenance). Returns the
    output URI."""
    writer = CheckpointWriter(uri, overwrite=overwrite, sources=sources, **storage_options)
    try:
        entries = [(t.key, DTYPE_NAMES[t.dtype], tuple(t.shape)) for t in tensors]
        shard = writer.shard(ADAPTER_WEIGHTS, entries, {"format": "pt", **(metadata or {})})
        try:
            for t in tensors:
                shard.write(t.key, t.load())
        except BaseException:
            shard.discard()
            raise
        shard.close()
        writer.write_json(ADAPTER_CONFIG, config)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return storage.full_uri(writer.fs, writer.path)
