"""Sparsifiers for task vectors: magnitude trim, random drop (DARE), outlier band (Breadcrumbs).

Every selection is a threshold found in linear time (radix selection, or ``torch.kthvalue``
per row), never a sort.
Entries tied with the threshold magnitude are all kept, as in the TIES reference code.
"""

from __future__ import annotations

import torch

from amalgam.methods.counter_random import CounterStream
from amalgam.methods.kernels import select
from amalgam.methods.kernels.select import top_bin


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: floor(density * n), but at least one of a non-empty tensor."""
    return min(numel, max(1, int(density * numel))) if numel else 0


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The exact k-th largest entry of non-negative ``magnitudes``, by radix selection.

    Non-negative float32 values order like their bit patterns: one histogram of the high
    16 bits finds the bin holding the answer, a second one of the low 16 bits inside that
    bin finds the value. Two linear passes, about twice as fast as ``torch.kthvalue``; on CPU
    (bf16, fp16, float32) both run fused in ``kernels.select``. Wider dtypes (float64), which
    float32 would round, use ``torch.kthvalue``.
    """
    if magnitudes.dtype.itemsize > 4:
        flat = magnitudes.reshape(-1)
        return flat.kthvalue(flat.numel() - k + 1).values.item()
    if select.supported(magnitudes):
        return select.kth_largest_magnitude(magnitudes, k)
    bits = magnitudes.float().reshape(-1).view(torch.int32)
    high_bits = bits >> 16
    b, above = top_bin(torch.bincount(high_bits, minlength=1 << 16), k)
    low = torch.bincount(bits[high_bits == b] & 0xFFFF, minlength=1 << 16)
    lo, _ = top_bin(low, k - above)
    return torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()


# Comparisons and torch.where run several times slower than arithmetic on CPU (bool tensors
# take a slow path), so masks here are float 0/1 indicators built from sign() and clamp().


def positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0 (a new tensor)."""
    return x.sign().clamp_(min=0)


def at_least(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 where x >= threshold, else 0.0 (exact: x - threshold is 0 only when they are equal)."""
    return (x - threshold).sign_().add_(1).clamp_(max=1)


class KeepAtLeast:
    """The applier keeping entries of magnitude at least ``threshold`` (None: all): TIES' trim,
    written as a value so that the fused kernels recognise it."""

    def __init__(self, threshold: float | None):
        self.threshold = threshold

    def __call__(self, chunk: torch.Tensor, rows: slice) -> torch.Tensor:
        if self.threshold is None:
            return chunk
        return chunk * at_least(chunk.abs(), self.threshold)


def trim_threshold(magnitudes: torch.Tensor, density: float) -> float | None:
    """The magnitude at or above which TIES keeps an entry (None: keep everything)."""
    if density >= 1.0 or magnitudes.numel() == 0:
        return None
    return kth_largest(magnitudes, keep_count(magnitudes.numel(), density))


def delta_threshold(x: torch.Tensor, base: torch.Tensor, density: float) -> float | None:
    """``trim_threshold`` of |x - base| in float32; on CPU without building the task vector."""
    if x.shape == base.shape and select.supported(x, base):
        if density >= 1.0 or x.numel() == 0:
            return None
        return select.kth_largest_magnitude(x, keep_count(x.numel(), density), base)
    return trim_threshold(torch.sub(x, base.float()).abs_(), density)


def trim_magnitude(
    delta: torch.Tensor, density: float, threshold: float | None = None
) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES trim).

    ``threshold`` replaces the per-tensor selection (the whole-model variant passes it in).
    """
    if threshold is None:
        threshold = trim_threshold(delta.abs(), density)
        if threshold is None:
            return delta
    return delta * at_least(delta.abs(), threshold)


CHUNK_ELEMENTS = 1 << 18
LANE = 1 << 31


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view: rows along the last dimension (a 1-D tensor is one row, a scalar 1x1)."""
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])


def row_chunks(rows: int, cols: int) -> list[slice]:
    """Row blocks of about CHUNK_ELEMENTS entries (at least one row): the unit of elementwise
    work, small enough to stay in cache."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


class RandomDrop:
    """DARE's drop-and-rescale, applied to any row block of a tensor on its own.

    Entry i is kept when its counter-based 31-bit lane (``counter_random.lanes``, a pure
    function of the stream key and i) falls below round(density * 2^31): the mask is the same
    whatever the blocks, order, executor or device. The keep probability is ``density`` to
    within 2^-31, and ``exact`` rescales by its exact inverse.
    """

    def __init__(self, density: float, key: int, rescale: str = "exact"):
        self.density, self.key, self.rescale = density, key, rescale
        self._stream: CounterStream | None = None  # on the device of the blocks
        self.cutoff = max(1, round(density * LANE))
        self.scale = LANE / self.cutoff if rescale == "exact" else 1.0

    @property
    def needs_fit(self) -> bool:
        return self.rescale == "l1" and self.density < 1.0

    def fit(self, delta_rows: torch.Tensor) -> None:
        """For ``l1``: the whole tensor's norm ratio under the same mask."""
        if not self.needs_fit:
            return
        before = after = 0.0
        for rows in row_chunks(*delta_rows.shape):
            chunk = delta_rows[rows]
            before += float(chunk.abs().sum(dtype=torch.float64))
            after += float((chunk * self.mask(chunk, rows)).abs().sum(dtype=torch.float64))
        self.fit_norms(before, after)

    def fit_norms(self, before: float, after: float) -> None:
        """For ``l1``: the scale from the L1 norms before and after the drop."""
        self.scale = before / after if before > 1e-7 and after > 1e-7 else 1.0

    def mask(self, chunk: torch.Tensor, rows: slice) -> torch.Tensor:
        """0/1 (int8) keep mask of the row block ``rows`` (``chunk``: those rows, 2-D)."""
        if self._stream is None or self._stream.device != chunk.device:
            self._stream = CounterStream(self.key, chunk.device)
        start = rows.start * chunk.shape[1]
        drawn = self._stream.lanes(start, start + chunk.numel())
        keep = drawn.neg_().add_(self.cutoff).sign_().clamp_(min=0).to(torch.int8)  # < cutoff
        return keep.reshape(chunk.shape)

    def apply(self, chunk: torch.Tensor, rows: slice) -> torch.Tensor:
        """Drop and rescale the row block ``rows`` (``chunk``: those rows, 2-D)."""
        if self.density >= 1.0:
            return chunk
        dropped = chunk * self.mask(chunk, rows)
        return dropped * self.scale if self.scale != 1.0 else dropped


def drop_random(
    delta: torch.Tensor, density: float, key: int, rescale: str = "exact"
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, then rescale the survivors.

    ``key`` names the random stream (``counter_random.stream_key``). ``exact`` divides by
    ``density`` (= 1 - p, arXiv 2311.03099); ``l1`` matches the L1 norm of the kept entries to
    the original (mergekit's rule); ``none`` only drops.
    """
    rows = as_rows(delta)
    drop = RandomDrop(density, key, rescale)
    drop.fit(rows)
    blocks = [drop.apply(rows[r], r) for r in row_chunks(*rows.shape)]
    return torch.cat(blocks).reshape(delta.shape)


def kth_largest_rows(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of each row, as a [rows, 1] column (radix selection for one row)."""
    if magnitudes.shape[0] == 1:
        return magnitudes.new_full((1, 1), kth_largest(magnitudes, k))
    return magnitudes.kthvalue(magnitudes.shape[1] - k + 1, dim=1, keepdim=True).values


def band_mask(
    delta: torch.Tensor, density: float, gamma: float, per_row: bool = False
) -> torch.Tensor:
    """Breadcrumbs' mask: drop exactly floor(gamma * n) largest magnitudes (ties broken by lower
    index first, the same on every device), keep the next ``density`` fraction (entries tied
    with the band's floor are kept). ``per_row`` ranks each row (last dimension) on its own, as
    the paper's code does; otherwise the whole tensor (mergekit). When floor(gamma * n) is 0,
    no outlier is removed."""
    rows = as_rows(delta) if per_row else delta.reshape(1, -1)
    n = rows.shape[1]
    mask = torch.ones_like(rows, dtype=torch.bool)
    if n == 0:
        return mask.reshape(delta.shape)
    n_top = int(gamma * n)
    n_keep = min(keep_count(n, density), n - n_top)
    mag = rows.abs()
    if n_top:
        top = kth_largest_rows(mag, n_top)
        mask = mag < top
        tied = mag == top
        missing = n_top - (mag > top).sum(1, keepdim=True)  # tied entries still to remove
        mask |= tied & (torch.cumsum(tied, 1, dtype=torch.int32) > missing)
    if n_keep <= 0:
        mask.zero_()
    elif n_keep < n - n_top:
        # The kept band's floor: the (n_top + n_keep)-th largest magnitude overall.
        mask &= mag >= kth_largest_rows(mag, n_top + n_keep)
    return mask.reshape(delta.shape)


def outlier_band(
    delta: torch.Tensor, density: float, gamma: float, per_row: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the top ``gamma`` fraction by magnitude, then keep the next ``density``."""
    return delta * band_mask(delta, density, gamma, per_row)
