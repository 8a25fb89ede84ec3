"""From torch tensors to the compiled kernels: eligibility, zero-copy views, threads.

The merge kernels run on contiguous CPU tensors in bfloat16, float16 or float32 (models in
one dtype; the base may differ), the selection on any CPU tensors in those dtypes; anything else
stays on the torch path. Entries are cut into contiguous ranges run on
``torch.get_num_threads()`` threads (the engine's compute threads) of one pool shared by every
kernel; every entry is computed on its own (the selection's integer counts are summed), so the
results do not depend on the cut.
``AMALGAM_FUSED_KERNELS=0`` keeps every merge on the torch path, as does a numba that cannot
load (for instance with no writable cache folder: set ``NUMBA_CACHE_DIR``), with one warning.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from types import ModuleType

import numpy as np
import torch

log = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_RANGE = 1 << 15  # entries per thread below which threads cost more than they save


def takes(t: torch.Tensor) -> bool:
    """Whether a kernel reads ``t``'s entries: a CPU tensor in one of ``DTYPES``."""
    return t.device.type == "cpu" and t.dtype in DTYPES


def enabled() -> bool:
    """Whether the kernels may run: not switched off, and numba loads them."""
    return os.environ.get("AMALGAM_FUSED_KERNELS", "1") != "0" and compiled() is not None


def eligible(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the merge kernels take these tensors (the first may be a base of another dtype)."""
    return (
        all(takes(t) and t.is_contiguous() for t in tensors)
        and len({t.dtype for t in tensors[1:]}) <= 1
        and enabled()
    )


@cache
def compiled() -> ModuleType | None:
    """The compiled kernels (``blocks``), or None where numba cannot load them."""
    try:
        return importlib.import_module("amalgam.methods.kernels.blocks")
    except (ImportError, RuntimeError) as e:  # numba missing, or no writable cache folder
        log.warning("fused kernels unavailable, merging on the torch path: %s", e)
        return None


def entries(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of ``t`` in its stored dtype (bfloat16 as uint16, float16 as int16
    bits: the kernels widen them); a flat copy where ``t`` is not contiguous."""
    flat = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return flat.view(torch.int16).numpy()
    return flat.numpy()


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="amalgam-kernel")


def run_ranges(kernel: Callable[[int, int], None], n: int) -> None:
    """``kernel(start, stop)`` over [0, n) in contiguous ranges, on the compute threads."""
    threads = max(1, min(torch.get_num_threads(), n // MIN_RANGE))
    if threads == 1:
        kernel(0, n)
        return
    step = -(-n // threads)
    starts = range(0, n, step)
    futures = [_pool(threads).submit(kernel, s, min(s + step, n)) for s in starts[1:]]
    kernel(0, min(step, n))  # the calling thread takes the first range
    for f in futures:
        f.result()
