"""The selection benchmark's baseline (main's two-pass kernel, copied into the script) and its
cases give the exact threshold and the same TIES bytes, on a tensor small enough to be quick."""

from __future__ import annotations

import torch

from amalgam.methods import ties
from amalgam.methods.sparsify import delta_threshold, keep_count
from tests.helpers import load_benchmark

bench = load_benchmark("selection")


def test_the_baseline_and_the_cases_agree_with_kthvalue() -> None:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(300, 70, generator=g) * 0.02).to(torch.bfloat16)
    models = [
        (base.float() + torch.randn(300, 70, generator=g) * 1e-3).to(torch.bfloat16)
        for _ in range(3)
    ]
    mag = torch.sub(models[0], base.float()).abs().reshape(-1)
    for density in bench.DENSITIES:
        k = keep_count(mag.numel(), density)
        assert bench.main_kth(models[0], k, base) == mag.kthvalue(mag.numel() - k + 1).values.item()
        medians = bench.measure(base, models, density, repeats=1)  # checks the cases agree
        assert set(medians) == {"kth main", "kth two-pass", "kth one-pass", "ties main", "ties now"}
        assert all(cpu >= 0 and wall >= 0 for cpu, wall in medians.values())
    assert ties.delta_threshold is delta_threshold  # restored after the cases ran
