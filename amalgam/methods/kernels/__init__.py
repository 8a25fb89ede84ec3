"""Fused CPU block kernels (numba) for the task-vector pipeline and the weighted average.

``scalar`` holds the per-entry float32 primitives (fused multiply-add, bf16/fp16 loads),
``counter`` the in-kernel DARE lanes, ``blocks`` the compiled kernels, ``launch`` the bridge
from torch tensors (dtype checks, threads), ``select`` the exact top-k magnitude selection.
numba is imported only when a kernel first runs.
"""
