"""PEFT LoRA adapters as merge inputs: read their config, map their tensors onto the base, and
present base + adapter as a model whose every tensor is materialised on read."""

from amalgam.adapters.open import AdapterCheckpoint, open_input, split_adapter_uri

__all__ = ["AdapterCheckpoint", "open_input", "split_adapter_uri"]
