"""Whole-model statistics gathered by a streaming pass before the per-tensor merge."""

from __future__ import annotations

import torch

from amalgam.methods.kernels import select
from amalgam.methods.kernels.select import top_bin


class MagnitudeThreshold:
    """Exact k-th largest |delta| over each model's whole task vector, in two streaming passes.

    Non-negative float32 values order like their bit patterns, so pass 1 histograms the high
    16 bits, finds the bin holding the k-th largest, and pass 2 histograms the low 16 bits
    inside that bin. Memory: two 65536-bin counters per model, whatever the model size.
    """

    key = "magnitude_threshold"
    passes = 2

    def __init__(self, densities: list[float]):
        self.densities = densities
        n = len(densities)
        self.high = torch.zeros(n, 1 << 16, dtype=torch.int64)
        self.low = torch.zeros(n, 1 << 16, dtype=torch.int64)
        self.bin: list[int] = []
        self.rank: list[int] = []

    def update(self, pass_: int, deltas: list[torch.Tensor]) -> None:
        for i, d in enumerate(deltas):
            if select.supported(d):  # one fused pass on CPU
                high = -1 if pass_ == 0 else self.bin[i]
                (self.high if pass_ == 0 else self.low)[i] += select.magnitude_histogram(
                    d, None, high
                )
                continue
            bits = d.float().abs().reshape(-1).view(torch.int32)
            if pass_ == 0:
                self.high[i] += torch.bincount(bits >> 16, minlength=1 << 16).cpu()
            else:
                inside = bits[(bits >> 16) == self.bin[i]] & 0xFFFF
                self.low[i] += torch.bincount(inside, minlength=1 << 16).cpu()

    def fork(self) -> MagnitudeThreshold:
        part = MagnitudeThreshold(self.densities)
        part.bin, part.rank = list(self.bin), list(self.rank)
        return part

    def join(self, part: MagnitudeThreshold) -> None:
        self.high += part.high
        self.low += part.low

    def end_pass(self, pass_: int) -> None:
        if pass_ != 0:
            return
        for i, density in enumerate(self.densities):
            total = int(self.high[i].sum())
            k = max(1, int(density * total))
            b, above = top_bin(self.high[i], k)
            self.bin.append(b)
            self.rank.append(k - above)

    def result(self) -> list[float]:
        out = []
        for i in range(len(self.densities)):
            lo, _ = top_bin(self.low[i], self.rank[i])
            bits = torch.tensor([(self.bin[i] << 16) | lo], dtype=torch.int32)
            out.append(bits.view(torch.float32).item())
        return out


def orderable(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values of ``x`` (negatives: low 31 bits flipped)."""
    bits = x.float().reshape(-1).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def from_orderable(key: int) -> float:
    """The float32 value of an ``orderable`` key."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


class OrderStatistics:
    """Exact ascending order statistics of a stream of float32 values, in two passes.

    ``orderable`` keys are histogrammed by their high 16 bits (pass 1); the bins holding the
    wanted ranks are then histogrammed by their low 16 bits (pass 2). Memory: 65536 counters
    per histogram, whatever the stream's length.
    """

    def __init__(self) -> None:
        self.high = torch.zeros(1 << 16, dtype=torch.int64)
        self.bins: list[int] = []
        self.low: dict[int, torch.Tensor] = {}
        self.maximum = float("-inf")

    @property
    def count(self) -> int:
        return int(self.high.sum())

    def add_high(self, values: torch.Tensor) -> None:
        keys = orderable(values)
        self.high += torch.bincount((keys >> 16) + (1 << 15), minlength=1 << 16).cpu()
        if keys.numel():
            self.maximum = max(self.maximum, float(values.max()))

    def fork(self) -> OrderStatistics:
        """The ranks chosen, empty counts (see :class:`amalgam.methods.needs.Collector`)."""
        part = OrderStatistics()
        if self.bins:
            part.ranks, part.bins = self.ranks, self.bins
            part.low = {b: torch.zeros_like(c) for b, c in self.low.items()}
        return part

    def join(self, part: OrderStatistics) -> None:
        self.high += part.high
        for b, counts in part.low.items():
            self.low[b] += counts
        self.maximum = max(self.maximum, part.maximum)

    def choose(self, ranks: list[int]) -> None:
        """Fix the 0-based ascending ranks wanted (after every value went through add_high)."""
        self.ranks = ranks
        cumulative = self.high.cumsum(0)
        self.bins = [int(torch.searchsorted(cumulative, rank, right=True)) for rank in ranks]
        self.low = {b: torch.zeros(1 << 16, dtype=torch.int64) for b in self.bins}

    def add_low(self, values: torch.Tensor) -> None:
        keys = orderable(values)
        high = (keys >> 16) + (1 << 15)
        for b, counts in self.low.items():
            counts += torch.bincount(keys[high == b] & 0xFFFF, minlength=1 << 16).cpu()

    def values(self) -> list[float]:
        out = []
        for rank, b in zip(self.ranks, self.bins, strict=True):
            below = int(self.high[:b].sum())
            low = int(torch.searchsorted(self.low[b].cumsum(0), rank - below, right=True))
            out.append(from_orderable(((b - (1 << 15)) << 16) | low))
        return out
