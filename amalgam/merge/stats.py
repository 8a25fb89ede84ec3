"""Whole-model statistics gathered by a streaming pass before the per-tensor merge."""

from __future__ import annotations

import torch

from amalgam.merge.sparsify import top_bin


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
            bits = d.float().abs().reshape(-1).view(torch.int32)
            if pass_ == 0:
                self.high[i] += torch.bincount(bits >> 16, minlength=1 << 16).cpu()
            else:
                inside = bits[(bits >> 16) == self.bin[i]] & 0xFFFF
                self.low[i] += torch.bincount(inside, minlength=1 << 16).cpu()

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
