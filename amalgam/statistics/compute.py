"""Compute a model's statistics on data, or reuse them from the cache under $AMALGAM_HOME."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from amalgam import storage
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.device import compute_threads, load_causal_lm
from amalgam.errors import StatisticsError
from amalgam.statistics.artifact import StatisticsInfo, read_info, write_artifact
from amalgam.statistics.data import encode, load_examples
from amalgam.statistics.fisher import fisher_diagonal
from amalgam.statistics.gram import gram_matrices
from amalgam.statistics.settings import settings_for, statistic_shape

__all__ = [
    "cache_path",
    "cached_statistics",
    "compute_statistics",
    "settings_for",  # the CLI's import path for it
]


def cache_path(model_hash: str, data_hash: str, kind: str, settings: dict) -> Path:
    """``$AMALGAM_HOME/statistics/<kind>-<key>.safetensors``, keyed by everything that matters."""
    body = json.dumps([model_hash, data_hash, kind, settings], sort_keys=True)
    key = hashlib.sha256(body.encode()).hexdigest()[:32]
    return storage.amalgam_home() / "statistics" / f"{kind}-{key}.safetensors"


def load_model(ckpt: Checkpoint, device: str) -> tuple[Any, Any]:
    if not storage.is_local(ckpt.fs) or ckpt.kind != "model" or not ckpt.config:
        raise StatisticsError(
            f"{ckpt.uri}: statistics need a local Hugging Face model folder (config.json, "
            "weights and tokenizer) to run the model"
        )
    try:
        return load_causal_lm(ckpt.root, device)
    except (OSError, ValueError) as exc:
        raise StatisticsError(f"{ckpt.uri}: cannot load the model to run it ({exc})") from None


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
        model, tokenizer = load_model(ckpt, device)
        max_length = int((ckpt.config or {}).get("max_position_embeddings") or 2048)
        encoded = encode(tokenizer, examples[: settings["samples"]], max_length)
        if kind == "fisher":
            tensors, used = fisher_diagonal(
                model, encoded, settings["fisher"], draws=settings.get("draws", 1)
            )
            tokens = sum(len(e.ids) - e.start for e in encoded if e.start < len(e.ids))
            if not used:
                raise StatisticsError(f"{data}: no example has a token to score")
        else:
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
