"""Where models and merges run: device choice, torch's compute threads, loading a model to run.

Importing this module loads no torch: the evaluation and zoo packages import it and must stay
light to import (torch is imported by the functions that need it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.errors import AmalgamError

if TYPE_CHECKING:
    import torch


class DeviceError(AmalgamError):
    """The requested device is not available on this machine."""


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU; any other torch device name as given,
    but a CUDA device requested where there is none is an error, not a fallback."""
    # lazy: torch takes a second to import; evaluation imports this module without running
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device: {device!r} is not a device name (auto, cpu, cuda)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device: {device} requested but no CUDA device is available")
    return chosen


@contextmanager
def compute_threads(threads: int | None, spare: int = 1) -> Iterator[None]:
    """torch's compute threads for one run: ``threads``, by default all cores but ``spare``
    (left to reads and writes); the caller's setting is restored afterwards."""
    # lazy: torch takes a second to import; evaluation imports this module without running
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - spare))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_causal_lm(folder: str | Path, device: str, dtype: str = "float32") -> tuple[Any, Any]:
    """(model in ``dtype`` on ``device``, in eval mode; its tokenizer) from a local Hugging Face
    model folder, or a PEFT adapter folder (loaded over its base, the tokenizer the base's
    unless the folder has its own), to run it (statistics, evaluation)."""
    # lazy: torch and transformers take seconds to import, and only running a model needs them
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: as above

    target = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(Path(folder)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model.to(target).eval(), tokenizer


def _tokenizer_source(folder: Path) -> Path | str:
    """Where ``folder``'s tokenizer is: the folder, or for a PEFT adapter folder without
    tokenizer files its base (``base_model_name_or_path``)."""
    config = folder / "adapter_config.json"
    if not config.is_file() or (folder / "tokenizer_config.json").is_file():
        return folder
    return json.loads(config.read_text()).get("base_model_name_or_path") or folder
