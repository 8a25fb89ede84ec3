"""The fused paths of ``linear`` and ``task_vector_merge``: scalars as the torch path rounds
them, one kernel call over every entry; ``None`` where the kernels do not apply."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from amalgam.methods.kernels import codes, launch
from amalgam.methods.sparsify import KeepAtLeast, RandomDrop

f32 = np.float32


def output(shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor in ``dtype`` (float32 unless a kernel dtype) and its flat entries to store
    into."""
    out = torch.empty(shape, dtype=dtype if dtype in launch.DTYPES else torch.float32)
    return out, launch.entries(out)


def linear(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    total: float | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """sum_i w_i x_i [/ total, unless None] in float32 (``linear.linear``'s arithmetic), stored
    in ``dtype`` as ``Tensor.to`` rounds, or None where the kernel does not apply."""
    if not launch.eligible([inputs[0], *inputs]):
        return None
    linear_block = launch.compiled().linear_block
    xs = tuple(launch.entries(x) for x in inputs)
    w = np.array(weights, dtype=np.float32)
    out, flat = output(inputs[0].shape, dtype)
    launch.run_ranges(
        lambda s, e: linear_block(xs, w, total is not None, f32(total or 0.0), s, e, flat),
        flat.size,
    )
    return out


def rule(applier: object) -> tuple[int, float, int, int, float] | None:
    """(rule, threshold, cutoff, key, scale) of a known per-entry applier, or None."""
    if applier is None:
        return codes.KEEP_ALL, 0.0, 0, 0, 1.0
    if isinstance(applier, KeepAtLeast):
        if applier.threshold is None:
            return codes.KEEP_ALL, 0.0, 0, 0, 1.0
        return codes.TRIM, applier.threshold, 0, 0, 1.0
    drop = getattr(applier, "__self__", None)  # RandomDrop.apply, bound
    if isinstance(drop, RandomDrop) and applier == drop.apply:
        if drop.density >= 1.0:
            return codes.KEEP_ALL, 0.0, 0, 0, 1.0
        return codes.DROP, 0.0, drop.cutoff, drop.key & ((1 << 64) - 1), drop.scale
    return None


def task_vector_merge(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    appliers: Sequence[object] | None,
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    consensus: str | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """``task_vectors.task_vector_merge``'s float32 result (no mask) stored in ``dtype`` as
    ``Tensor.to`` rounds, or None."""
    if not launch.eligible([base, *inputs]):
        return None
    rules = [rule(a) for a in appliers] if appliers is not None else [rule(None)] * len(inputs)
    if any(r is None for r in rules):
        return None
    blocks = launch.compiled()
    kinds, thresholds, cutoffs, keys, scales = (list(c) for c in zip(*rules, strict=True))
    vote = {None: codes.NO_VOTE, "sum": codes.VOTE_SUM, "count": codes.VOTE_COUNT}[consensus]
    norm, norm_value = codes.NO_DIVISION, 1.0
    if normalize and consensus is None and abs(sum(weights)) >= 1e-8:
        norm, norm_value = codes.DIVIDE, sum(weights)
    elif normalize and consensus is not None:
        nonzero = [w for w in weights if w != 0]
        if nonzero and min(nonzero) >= 1e-8:
            norm, norm_value = codes.CLAMP_DIVIDE, min(nonzero)
        else:
            norm = codes.GUARD_DIVIDE
    b = launch.entries(base)
    xs = tuple(launch.entries(x) for x in inputs)
    args = (
        np.array(kinds, dtype=np.int8),
        np.array(thresholds, dtype=np.float32),
        np.array(cutoffs, dtype=np.int64),
        np.array(keys, dtype=np.uint64),
        np.array(scales, dtype=np.float32),
        np.array(weights, dtype=np.float32),
        np.sign(np.array(weights, dtype=np.float64)).astype(np.int8),
        np.array([np.copysign(1.0, w) if w else 0.0 for w in weights], dtype=np.float32),
        vote,
        norm,
        f32(norm_value),
        f32(lam),
    )
    out, flat = output(base.shape, dtype)
    launch.run_ranges(lambda s, e: blocks.task_vector_block(b, xs, *args, s, e, flat), flat.size)
    return out


def drop_norms(x: torch.Tensor, base: torch.Tensor, drop: RandomDrop) -> tuple[float, float] | None:
    """The L1 norms of the task vector x - base before and after ``drop``'s mask (its ``l1``
    rescale), or None where the kernels do not apply. float64 partial sums in a fixed order
    (``blocks.drop_norms``), added in chunk order: the same on every thread count."""
    if not launch.eligible([base, x]):
        return None
    blocks = launch.compiled()
    xe, be = launch.entries(x), launch.entries(base)
    chunk = blocks.NORM_CHUNK
    partials = np.zeros((-(-xe.size // chunk), 2), dtype=np.float64)
    key, cutoff = np.uint64(drop.key & ((1 << 64) - 1)), np.int64(drop.cutoff)

    def run(start: int, stop: int) -> None:  # the chunks that start in [start, stop)
        blocks.drop_norms(xe, be, key, cutoff, -(-start // chunk), -(-stop // chunk), partials)

    launch.run_ranges(run, xe.size)
    before = after = 0.0
    for b, a in partials:
        before += float(b)
        after += float(a)
    return before, after


# a float dtype's bit patterns as unsigned integers, and its exponent bits
EXPONENT_BITS = {
    torch.bfloat16: (np.uint16, np.uint16(0x7F80)),
    torch.float16: (np.uint16, np.uint16(0x7C00)),
    torch.float32: (np.uint32, np.uint32(0x7F800000)),
}


def all_finite(x: torch.Tensor) -> bool | None:
    """Whether every entry of ``x`` is finite, from its exponent bits in one pass on the calling
    thread (a read-ahead thread: no compute threads taken), or None where the kernels do not
    apply."""
    if not (launch.takes(x) and launch.enabled()):
        return None
    unsigned, exponent = EXPONENT_BITS[x.dtype]
    bits = launch.entries(x).view(unsigned)
    return launch.compiled().nonfinite_count(bits, exponent) == 0
