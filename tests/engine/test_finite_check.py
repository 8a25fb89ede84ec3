"""The engine's finiteness check: the exponent-bit kernel against torch.isfinite."""

from __future__ import annotations

import pytest
import torch

from amalgam.engine.execute import finite
from amalgam.methods.kernels.merge import all_finite

AWKWARD = [0.0, -0.0, 1e-40, -3.0e38, 3.0e38, 65504.0, 6e-8, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf"), "payload"])
def test_the_kernel_agrees_with_isfinite(dtype: torch.dtype, bad: object) -> None:
    x = torch.randn(3, 70001, generator=torch.Generator().manual_seed(1))
    x[0, : len(AWKWARD)] = torch.tensor(AWKWARD)
    x = x.to(dtype)  # 3e38 overflows fp16 to inf: torch.isfinite decides what we expect
    if bad == "payload":  # a NaN with payload bits set
        bits = {torch.bfloat16: 0x7F81, torch.float16: 0x7C01, torch.float32: 0x7F800123}
        view = {torch.float32: torch.int32}.get(dtype, torch.int16)
        x.view(view)[2, -1] = bits[dtype]  # all below 2^15: fits int16 as written
    elif bad is not None:
        x[1, 12345] = bad
    want = bool(torch.isfinite(x).all())
    assert all_finite(x) is want
    assert finite(x) is want
    assert finite(x.t()) is want  # not contiguous: a copy is checked


def test_other_dtypes_take_torch() -> None:
    x = torch.ones(10, dtype=torch.float64)
    assert all_finite(x) is None and finite(x)
    x[3] = float("nan")
    assert not finite(x)
