"""PEFT adapters: read as merge inputs (base + adapter materialised per tensor), merged as
factors, written, extracted from full fine-tunes."""

from amalgam.adapters.open import AdapterCheckpoint, open_input, split_adapter_uri

__all__ = ["AdapterCheckpoint", "open_input", "split_adapter_uri"]
