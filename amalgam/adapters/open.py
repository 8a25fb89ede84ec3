"""Open a merge input that may be a PEFT adapter: base + adapter reads as a dense model whose
tensors are materialised one at a time (memory bounded by the largest tensor)."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import torch

from amalgam import storage
from amalgam.adapters.dense import apply_patch
from amalgam.adapters.layout import adapter_layout
from amalgam.adapters.peft_config import AdapterConfig, parse_adapter_config
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.errors import CheckpointError, PlanError

ADAPTER_SEP = "+"  # mergekit's reference syntax: BASE+ADAPTER


def split_adapter_uri(uri: str, **storage_options: Any) -> tuple[str | None, str]:
    """(base, adapter) of a ``BASE+ADAPTER`` reference, split at its last ``+``; (None, uri)
    for a plain URI, or for one that exists on storage as written (a path holding ``+``)."""
    if ADAPTER_SEP not in uri:
        return None, uri
    fs, path = storage.resolve(uri, **storage_options)
    if fs.exists(path):
        return None, uri
    base, adapter = uri.rsplit(ADAPTER_SEP, 1)
    return base, adapter


class AdapterCheckpoint(Checkpoint):
    """A base model with a LoRA adapter merged in, read lazily: the base's tensor table,
    config and side files; each tensor read is the base's with the adapter applied
    (:func:`amalgam.adapters.dense.apply_patch`) or the adapter's whole copy
    (``modules_to_save``). ``uri`` is ``BASE+ADAPTER``, which :func:`open_input` reopens."""

    def __init__(
        self, base: Checkpoint, adapter: Checkpoint, config: AdapterConfig, base_in_uri: bool
    ):
        # the two opened checkpoints do every read; nothing of Checkpoint's own layout is read
        self.base, self.adapter, self.adapter_config = base, adapter, config
        self.base_in_uri = base_in_uri
        self.uri = f"{base.uri}{ADAPTER_SEP}{adapter.uri}"
        self.storage_options = base.storage_options
        self.fs, self.path, self.root, self.files = base.fs, base.path, base.root, base.files
        self.kind, self.config, self.metadata = base.kind, base.config, base.metadata
        self.tensors = base.tensors
        self._lock, self._fds, self._pickled = threading.Lock(), {}, None
        self.layout = adapter_layout(config, adapter.tensors, base.tensors, adapter.uri)

    def tensor(self, name: str) -> torch.Tensor:
        info = self.info(name)
        whole = self.layout.whole.get(name)
        w0 = self.adapter.tensor(whole).to(info.torch_dtype) if whole else self.base.tensor(name)
        patch = self.layout.patches.get(name)
        return w0 if patch is None else apply_patch(w0, patch, self.adapter.tensor)

    def view(self, name: str) -> torch.Tensor:
        return self.tensor(name)  # every tensor is computed: nothing to map

    def stored_parts(self) -> list[Checkpoint]:
        return [self.base, self.adapter]

    def content_hash(self) -> str:
        """The adapter's own content hash (as ``amalgam fetch`` hashes the folder) when its
        base is the recipe's, a parent of its own; for ``BASE+ADAPTER``, sha256 over both."""
        if not self.base_in_uri:
            return self.adapter.content_hash()
        both = f"{self.base.content_hash()}{ADAPTER_SEP}{self.adapter.content_hash()}"
        return "sha256:" + hashlib.sha256(both.encode()).hexdigest()

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.uri!r}, {len(self.layout.patches)} modules patched)"


def open_input(
    uri: str, *, base: str | None = None, allow_pickle: bool = False, **storage_options: Any
) -> Checkpoint:
    """Open a merge input lazily. A PEFT adapter (``adapter_config.json`` with its weights)
    opens over its base: the one ``uri`` names (``BASE+ADAPTER``), else ``base``; a plain
    model opens as it is."""
    given, path = split_adapter_uri(uri, **storage_options)
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle, **storage_options)
    if ckpt.kind != "adapter":
        if given is not None:
            ckpt.close()
            raise CheckpointError(
                f"{uri}: '{path}' is not a PEFT adapter (adapter_config.json and "
                "adapter_model.safetensors), so it cannot follow '+'"
            )
        return ckpt
    base_uri = given or base
    try:
        config = _adapter_config(ckpt)
        if given is None and base == uri:
            raise PlanError(
                f"{uri}: the recipe's base is a LoRA adapter; give the model it adapts as the "
                f"base, or write BASE{ADAPTER_SEP}{uri}"
            )
        if base_uri is None:
            raise PlanError(
                f"{uri}: a LoRA adapter with no base: give the recipe a base, or write the "
                f"model as BASE{ADAPTER_SEP}{uri}"
            )
        base_ckpt = open_checkpoint(base_uri, allow_pickle=allow_pickle, **storage_options)
    except BaseException:
        ckpt.close()
        raise
    try:
        if base_ckpt.kind == "adapter":
            raise PlanError(f"{uri}: its base {base_uri} is itself an adapter, not a model")
        return AdapterCheckpoint(base_ckpt, ckpt, config, given is not None)
    except BaseException:
        base_ckpt.close()
        ckpt.close()
        raise


def _adapter_config(ckpt: Checkpoint) -> AdapterConfig:
    """The adapter folder's ``adapter_config.json``, read and checked."""
    path = storage.join(ckpt.root, "adapter_config.json")
    source = storage.full_uri(ckpt.fs, path)
    if not ckpt.fs.exists(path):
        raise CheckpointError(f"{source}: missing (a PEFT adapter folder needs its config)")
    try:
        with ckpt.fs.open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    return parse_adapter_config(data, source)
