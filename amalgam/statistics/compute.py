"""Compute a model's statistics on data, or reuse them from the cache under $AMALGAM_HOME."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amalgam import storage
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.errors import StatisticsError
from amalgam.statistics.artifact import KINDS, StatisticsInfo, read_info, write_artifact
from amalgam.statistics.data import encode, load_examples
from amalgam.statistics.fisher import VARIANTS

DEFAULT_SAMPLES = 256  # FusionBench's count for both Fisher and RegMean
# Bumped when a kind's artifacts change content, so older cached artifacts are not reused.
# Gram 2: artifacts also hold the input embedding's token shares.
GRAM_VERSION = 2


def settings_for(kind: str, samples: int = DEFAULT_SAMPLES, fisher: str = "sampled") -> dict:
    """The settings that change a statistic's value (part of its cache key), checked."""
    if kind not in KINDS:
        raise StatisticsError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise StatisticsError(f"samples: expected a positive integer, got {samples!r}")
    if kind == "gram":
        return {"samples": samples, "version": GRAM_VERSION}
    if fisher not in VARIANTS:
        raise StatisticsError(f"fisher: expected one of {list(VARIANTS)}, got {fisher!r}")
    return {"samples": samples, "fisher": fisher}


def statistic_shape(kind: str, tensor_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """The shape a ``kind`` statistic of ``ndim`` dimensions must have for a tensor of
    ``tensor_shape``: Fisher the tensor's own; Gram (in x in) for a linear layer, or one token
    share per row (a vector) for an input embedding."""
    if kind == "fisher":
        return tuple(tensor_shape)
    return tuple(tensor_shape[:1]) if ndim == 1 else (tensor_shape[-1],) * 2


def cache_path(model_hash: str, data_hash: str, kind: str, settings: dict) -> Path:
    """``$AMALGAM_HOME/statistics/<kind>-<key>.safetensors``, keyed by everything that matters."""
    body = json.dumps([model_hash, data_hash, kind, settings], sort_keys=True)
    key = hashlib.sha256(body.encode()).hexdigest()[:32]
    return storage.amalgam_home() / "statistics" / f"{kind}-{key}.safetensors"


def _load_model(ckpt: Checkpoint, device: str) -> tuple[Any, Any]:
    if not storage.is_local(ckpt.fs) or ckpt.kind != "model" or not ckpt.config:
        raise StatisticsError(
            f"{ckpt.uri}: statistics need a local Hugging Face model folder (config.json, "
            "weights and tokenizer) to run the model"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.engine.execute import pick_device

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt.root)
        model = AutoModelForCausalLM.from_pretrained(ckpt.root, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise StatisticsError(f"{ckpt.uri}: cannot load the model to run it ({exc})") from None
    return model.to(pick_device(device)), tokenizer


def compute_statistics(
    model_uri: str,
    data: str,
    kind: str,
    settings: dict,
    output: str,
    *,
    device: str = "auto",
    threads: int | None = None,
    loaded: tuple[list, str] | None = None,
    **storage_options: Any,
) -> StatisticsInfo:
    """Run the model on (up to ``settings['samples']`` of) the examples of ``data`` and write
    ``kind`` statistics to ``output``, keyed by the names of the model's own tensors.
    ``threads``: torch compute threads (default: all cores but one, as for merges);
    ``loaded``: ``load_examples(data)``'s result when the caller has it already."""
    from amalgam.engine.execute import compute_threads

    examples, data_hash = loaded or load_examples(data, **storage_options)
    with compute_threads(threads):
        tensors, used, tokens, model_hash = _run(model_uri, data, examples, kind, settings, device)
    return write_artifact(
        output,
        tensors,
        kind=kind,
        model_hash=model_hash,
        data_hash=data_hash,
        samples=used,
        tokens=tokens,
        settings=settings,
        **storage_options,
    )


def _run(
    model_uri: str, data: str, examples: list, kind: str, settings: dict, device: str
) -> tuple[dict, int, int, str]:
    with open_checkpoint(model_uri) as ckpt:
        model_hash = ckpt.content_hash()
        model, tokenizer = _load_model(ckpt, device)
        max_length = int((ckpt.config or {}).get("max_position_embeddings") or 2048)
        encoded = encode(tokenizer, examples[: settings["samples"]], max_length)
        if kind == "fisher":
            from amalgam.statistics.fisher import fisher_diagonal

            tensors, used = fisher_diagonal(model, encoded, settings["fisher"])
            tokens = sum(len(e.ids) - e.start for e in encoded if e.start < len(e.ids))
            if not used:
                raise StatisticsError(f"{data}: no example has a token to score")
        else:
            from amalgam.statistics.gram import gram_matrices

            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            tensors, tokens = gram_matrices(model, encoded, pad)
            used = len(encoded)
        stored = {n: t for n, t in tensors.items() if n in ckpt.tensors}
        for name, t in stored.items():
            want = statistic_shape(kind, ckpt.shape(name), t.dim())
            if tuple(t.shape) != want:
                raise StatisticsError(
                    f"{model_uri}: statistic of '{name}' has shape {list(t.shape)}, the "
                    f"checkpoint's tensor implies {list(want)}"
                )
    return stored, used, tokens, model_hash


def cached_statistics(
    model_uri: str,
    data: str,
    kind: str,
    settings: dict,
    *,
    device: str = "auto",
    threads: int | None = None,
    **storage_options: Any,
) -> tuple[StatisticsInfo, bool]:
    """The statistics of (model, data, kind, settings) from the cache, computed on a miss.
    Returns (info, whether they were computed now). ``storage_options`` serve the data."""
    loaded = load_examples(data, **storage_options)
    data_hash = loaded[1]
    with open_checkpoint(model_uri) as ckpt:
        model_hash = ckpt.content_hash()
    path = cache_path(model_hash, data_hash, kind, settings)
    if path.is_file():
        return read_info(str(path)), False
    info = compute_statistics(
        model_uri,
        data,
        kind,
        settings,
        str(path),
        device=device,
        threads=threads,
        loaded=loaded,
        **storage_options,
    )
    return info, True
