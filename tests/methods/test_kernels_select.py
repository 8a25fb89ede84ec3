"""The fused selection kernel (``kernels.select``) against torch.kthvalue and main's torch path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from amalgam.engine import MergeOptions, run_merge
from amalgam.methods import ties
from amalgam.methods.kernels import launch, select
from amalgam.methods.sparsify import keep_count, kth_largest
from amalgam.methods.whole_model import MagnitudeThreshold
from amalgam.recipe import parse_recipe
from tests.helpers import recipe_dict, write_model

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
THREADS = (1, 2, 3)
SHAPES = ((), (1,), (7,), (1001,), (13, 17), (3, 5, 11))


@pytest.fixture(params=THREADS, ids=lambda t: f"threads{t}")
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(launch, "MIN_RANGE", 64)  # cut even small tensors into ranges
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def bits(value: float) -> int:
    return torch.tensor([value], dtype=torch.float32).view(torch.int32).item()


def awkward(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with many ties, exact zeros of both signs, and (sub)normals near zero."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, torch.Size(shape).numel())
    tiny = torch.finfo(dtype).tiny
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, tiny, -tiny / 4, tiny / 8, 3e-3, -3e-3])
    values = torch.randn(n, generator=g)
    pick = torch.randint(0, 2 * len(pool), (n,), generator=g)
    picked = pick < len(pool)
    values[picked] = pool[pick[picked]]
    return values.to(dtype).reshape(shape)


def reference(x: torch.Tensor, base: torch.Tensor | None, k: int) -> float:
    """k-th largest of the float32 magnitudes, as the torch path computes them, by kthvalue."""
    mag = (x.abs() if base is None else torch.sub(x, base.float()).abs()).float().reshape(-1)
    return mag.kthvalue(mag.numel() - k + 1).values.item()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base_dtype", DTYPES, ids=str)
def test_kth_largest_delta_magnitude_equals_kthvalue(shape, x_dtype, base_dtype, threads):
    x, base = awkward(shape, x_dtype, 1), awkward(shape, base_dtype, 2)
    n = x.numel()
    for k in sorted({min(n, k) for k in (1, 2, n // 3 or 1, keep_count(n, 0.2), n - 1 or 1, n)}):
        got = select.kth_largest_magnitude(x, k, base)
        assert bits(got) == bits(reference(x, base, k)), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kth_largest_of_magnitudes_equals_kthvalue(dtype, threads):
    x = awkward((257, 33), dtype, 3)
    for k in (1, 100, 4000, x.numel()):
        assert bits(kth_largest(x.abs(), k)) == bits(reference(x, None, k))


def test_every_fp16_and_bf16_bit_pattern_converts_as_torch(threads):
    # All 65536 patterns (NaNs, infinities, subnormals, -0): both histograms of |x| must equal
    # those of torch's own conversion to float32.
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = patterns.view(dtype)
        m = x.float().abs().view(torch.int32)
        high = torch.bincount(m >> 16, minlength=1 << 16)
        assert torch.equal(select.magnitude_histogram(x), high)
        for b in (0, int(m.max()) >> 16, 0x3F80):
            low = torch.bincount(m[(m >> 16) == b] & 0xFFFF, minlength=1 << 16)
            assert torch.equal(select.magnitude_histogram(x, None, b), low)


def test_denormal_differences_are_kept_exactly(threads):
    # float32 subtraction underflowing to subnormals: no flush to zero anywhere.
    tiny = torch.finfo(torch.float32).tiny
    base = torch.full((1000,), tiny)
    x = base + tiny * torch.linspace(-0.5, 0.5, 1000)
    for k in (1, 500, 1000):
        assert bits(select.kth_largest_magnitude(x, k, base)) == bits(reference(x, base, k))


def test_bad_arguments_are_refused():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="shapes differ"):
        select.kth_largest_magnitude(x, 1, torch.ones(5))
    with pytest.raises(ValueError, match="k=5"):
        select.kth_largest_magnitude(x, 5)
    with pytest.raises(ValueError, match="bf16, fp16 or float32"):
        select.kth_largest_magnitude(x.double(), 1)
    assert not select.supported(torch.ones(2, dtype=torch.float64))


def old_threshold(x: torch.Tensor, base: torch.Tensor, density: float) -> float | None:
    """main's per-tensor TIES threshold: the float32 task vector, then its exact k-th largest."""
    if density >= 1.0 or x.numel() == 0:
        return None
    return reference(x, base, keep_count(x.numel(), density))


@pytest.mark.parametrize("method", ["ties", "consensus_ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((), (1,), (1001,), (37, 53)), ids=str)
def test_ties_is_byte_identical_to_the_torch_threshold(merge, monkeypatch, method, dtype, shape):
    base = awkward(shape, dtype, 10)
    inputs = [(base.float() + awkward(shape, dtype, 11 + i).float()).to(dtype) for i in range(3)]
    params = {"density": 0.3} if method == "ties" else {"density": 0.3, "agreement": 2}
    fused = merge(method, base, inputs, params=params)
    monkeypatch.setattr(ties, "delta_threshold", old_threshold)
    old = merge(method, base, inputs, params=params)
    assert fused.dtype == old.dtype
    assert torch.equal(fused.view(torch.int32), old.view(torch.int32))


def test_dare_ties_is_unchanged_by_the_selection_kernel(merge, monkeypatch):
    # dare_ties draws masks instead of selecting: the kernel must not be on its path.
    base = awkward((64, 33), torch.bfloat16, 20)
    inputs = [awkward((64, 33), torch.bfloat16, 21 + i) for i in range(3)]
    fused = merge("dare_ties", base, inputs, params={"density": 0.5})

    def refuse(*args: object) -> float:
        raise AssertionError("selection kernel called by dare_ties")

    monkeypatch.setattr(select, "kth_largest_magnitude", refuse)
    assert torch.equal(fused, merge("dare_ties", base, inputs, params={"density": 0.5}))


def test_whole_model_threshold_histograms_match_torch(threads):
    deltas = [awkward((300, 7), torch.float32, 30 + i) for i in range(2)]
    fused, old = MagnitudeThreshold([0.3, 0.1]), MagnitudeThreshold([0.3, 0.1])
    for pass_ in range(2):
        fused.update(pass_, deltas)
        for i, d in enumerate(deltas):  # main's bincount path, by hand
            m = d.abs().reshape(-1).view(torch.int32)
            if pass_ == 0:
                old.high[i] += torch.bincount(m >> 16, minlength=1 << 16)
            else:
                old.low[i] += torch.bincount(m[(m >> 16) == old.bin[i]] & 0xFFFF, minlength=1 << 16)
        assert torch.equal(fused.high, old.high) and torch.equal(fused.low, old.low)
        fused.end_pass(pass_)
        old.end_pass(pass_)
    flat = [d.abs().reshape(-1) for d in deltas]
    expected = [
        f.kthvalue(f.numel() - keep_count(f.numel(), dn) + 1).values.item()
        for f, dn in zip(flat, (0.3, 0.1), strict=True)
    ]
    assert [bits(v) for v in fused.result()] == [bits(v) for v in expected]


def test_float64_inputs_take_the_torch_path(merge, monkeypatch):
    # Not a kernel dtype: the threshold comes from torch, by main's formula (base as float32).
    base = awkward((40, 9), torch.float32, 40).double()
    inputs = [base + awkward((40, 9), torch.float32, 41 + i).double() for i in range(3)]
    fused = merge("ties", base, inputs, params={"density": 0.3})

    def exact(x: torch.Tensor, base: torch.Tensor, density: float) -> float:
        mag = torch.sub(x, base.float()).abs().reshape(-1)
        return mag.kthvalue(mag.numel() - keep_count(mag.numel(), density) + 1).values.item()

    monkeypatch.setattr(ties, "delta_threshold", exact)
    assert torch.equal(fused, merge("ties", base, inputs, params={"density": 0.3}))


# The one-pass selection: a sampled bracket, one counting pass, the two passes as fallback.


@pytest.fixture
def small_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample of 16 runs of 32 entries from tensors of 4096 entries on: the one pass runs on
    tensors small enough for fast tests (its bracket is wide: taken however wide)."""
    monkeypatch.setattr(select, "MIN_ENTRIES", 4096)
    monkeypatch.setattr(select, "MAX_SHARE", 1.0)
    monkeypatch.setattr(select, "RUNS", 16)
    monkeypatch.setattr(select, "RUN", 32)


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the one pass found the value, and how often the two passes ran."""
    seen = {"one": 0, "two": 0}
    one, two = select.one_pass, select.two_pass

    def counted_one(*args: object) -> int | None:
        found = one(*args)
        seen["one"] += found is not None
        return found

    def counted_two(*args: object) -> int:
        seen["two"] += 1
        return two(*args)

    monkeypatch.setattr(select, "one_pass", counted_one)
    monkeypatch.setattr(select, "two_pass", counted_two)
    return seen


def distributions(n: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Task-vector magnitudes of several shapes of distribution, as x (base: zeros)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g)
    tiny = torch.finfo(dtype).tiny
    return {
        "awkward": awkward((n,), dtype, seed),
        "heavy tailed": (normal / torch.rand(n, generator=g).clamp_(min=1e-3)).to(dtype),
        "all equal": torch.full((n,), -0.75).to(dtype),
        "ties at the threshold": torch.where(normal.abs() < 1.2, 0.5, normal).to(dtype),
        "zeros of both signs": torch.where(normal > 0, 0.0, -0.0).to(dtype),
        "mostly zero": torch.where(normal > 1.0, normal, 0.0).to(dtype),
        "subnormal": (normal * tiny).to(dtype),
    }


def ranks(n: int) -> list[int]:
    return sorted({1, 2, n // 3, keep_count(n, 0.2), keep_count(n, 0.5), n - 1, n})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_pass_equals_kthvalue(dtype, threads, small_sample, paths):
    n = 6007  # not a multiple of any block or range
    for name, x in distributions(n, dtype, 50).items():
        for k in ranks(n):
            got = select.kth_largest_magnitude(x, k)
            assert bits(got) == bits(reference(x, None, k)), (name, k)
    assert paths["one"] > 0


@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base_dtype", DTYPES, ids=str)
def test_one_pass_of_a_delta_equals_kthvalue(x_dtype, base_dtype, threads, small_sample, paths):
    base = awkward((61, 97), base_dtype, 60)
    x = (base.float() + torch.randn(61, 97, generator=torch.Generator().manual_seed(61))).to(
        x_dtype
    )
    for k in ranks(x.numel()):
        assert bits(select.kth_largest_magnitude(x, k, base)) == bits(reference(x, base, k)), k
    assert paths["two"] == 0  # a smooth distribution: the bracket always held the value


def test_a_sample_that_misses_falls_back_to_two_passes(threads, small_sample, paths):
    # Every sampled run is zero, the rest is not: the bracket [0, 0] holds no k-th largest.
    n = 8192
    x = torch.rand(n, generator=torch.Generator().manual_seed(70)) + 1.0
    for start in select.sample_starts(n):
        x[start : start + select.RUN] = 0.0
    for k in (1, keep_count(n, 0.2), n - select.RUNS * select.RUN):
        assert bits(select.kth_largest_magnitude(x, k)) == bits(reference(x, None, k)), k
    assert paths == {"one": 0, "two": 3}


def test_more_entries_inside_than_the_sample_promised_fall_back(threads, small_sample, paths):
    # The sample spreads over [0, 1); the rest crowds into the middle of its bracket: the
    # buffers for the entries inside fill up, and the two passes give the value.
    n = 8192
    g = torch.Generator().manual_seed(80)
    x = 0.49 + 0.02 * torch.rand(n, generator=g)
    for start in select.sample_starts(n):
        x[start : start + select.RUN] = torch.rand(select.RUN, generator=g)
    k = keep_count(n, 0.5)
    assert bits(select.kth_largest_magnitude(x, k)) == bits(reference(x, None, k))
    assert paths == {"one": 0, "two": 1}


def test_the_counting_kernel_stops_when_its_buffer_is_full():
    blocks = launch.compiled()
    x = launch.entries(torch.linspace(1.0, 2.0, 5000))
    lo, hi = (torch.tensor([v]).view(torch.int32).item() for v in (0.5, 3.0))
    buffer = np.empty(blocks.BLOCK + 100, np.uint32)
    assert blocks.bracket_counts(x, None, np.uint32(lo), np.uint32(hi), 0, 5000, buffer)[3] == -1
    buffer = np.empty(5000 + blocks.BLOCK, np.uint32)
    counts = blocks.bracket_counts(x, None, np.uint32(lo), np.uint32(hi), 0, 5000, buffer)
    assert counts == (0, 0, 0, 5000)
    assert np.array_equal(buffer[:5000], x.view(np.uint32))


def test_counts_around_a_bracket_equal_a_naive_count():
    blocks = launch.compiled()
    m = awkward((3001,), torch.float32, 90).abs()
    mags = m.view(torch.int32).tolist()
    lo, hi = sorted(mags)[1000], sorted(mags)[2500]
    buffer = np.empty(3001 + blocks.BLOCK, np.uint32)
    counts = blocks.bracket_counts(
        launch.entries(m), None, np.uint32(lo), np.uint32(hi), 0, 3001, buffer
    )
    between = [v for v in mags if lo < v < hi]
    expected = (sum(v > hi for v in mags), mags.count(hi), mags.count(lo), len(between))
    assert counts == expected
    assert sorted(buffer[: len(between)].tolist()) == sorted(between)


def test_one_pass_at_the_default_sample_size(paths):
    # The shipped constants on a tensor just above MIN_ENTRIES, as TIES trims it.
    shape = (1024, select.MIN_ENTRIES // 1024 + 3)
    g = torch.Generator().manual_seed(100)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    x = (base.float() + torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16)
    for density in (0.2, 0.5):
        k = keep_count(x.numel(), density)
        assert bits(select.kth_largest_magnitude(x, k, base)) == bits(reference(x, base, k))
    assert paths == {"one": 2, "two": 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_on_the_one_pass_is_byte_identical(merge, monkeypatch, small_sample, paths, dtype):
    base = awkward((61, 97), dtype, 110)
    inputs = [
        (base.float() + awkward((61, 97), dtype, 111 + i).float()).to(dtype) for i in range(3)
    ]
    fused = merge("ties", base, inputs, params={"density": 0.2})
    assert paths["one"] == 3
    monkeypatch.setattr(ties, "delta_threshold", old_threshold)
    old = merge("ties", base, inputs, params={"density": 0.2})
    assert torch.equal(
        fused.view(torch.int32 if dtype == torch.float32 else torch.int16),
        old.view(torch.int32 if dtype == torch.float32 else torch.int16),
    )


def test_ties_merge_through_the_engine_equals_the_torch_path(tmp_path, monkeypatch, paths):
    # A tensor large enough for the shipped sample (and a small one on the two passes): the
    # merged files' bytes equal those of the torch path (AMALGAM_FUSED_KERNELS=0).
    shapes = {"big.weight": (1024, select.MIN_ENTRIES // 1024 + 7), "small.weight": (33, 17)}
    g = torch.Generator().manual_seed(120)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    base_dir = write_model(tmp_path / "base", {k: v.bfloat16() for k, v in base.items()})
    experts = [
        write_model(
            tmp_path / f"m{i}",
            {k: (v + torch.randn(v.shape, generator=g) * 1e-3).bfloat16() for k, v in base.items()},
        )
        for i in range(3)
    ]

    def digest(out: str) -> dict[str, str]:
        recipe = recipe_dict(base_dir, experts, "ties", tmp_path / out, params={"density": 0.2})
        run_merge(parse_recipe(recipe), MergeOptions(device="cpu", threads=2))
        files = sorted((tmp_path / out).glob("*.safetensors"))
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    fused = digest("fused")
    assert paths == {"one": 3, "two": 3}  # the big tensor in one pass, the small in two
    monkeypatch.setenv("AMALGAM_FUSED_KERNELS", "0")
    assert digest("torch") == fused
    assert paths == {"one": 3, "two": 3}  # the torch path calls neither


def test_a_wide_bracket_takes_two_passes_without_the_counting_pass(
    monkeypatch, small_sample, paths
):
    # Over MAX_SHARE of the sample inside the bracket: no counting pass, straight to two.
    monkeypatch.setattr(select, "MAX_SHARE", 0.0)
    counted = []
    monkeypatch.setattr(launch.compiled(), "bracket_counts", lambda *a: counted.append(a))
    x = awkward((6007,), torch.float32, 130)
    k = keep_count(x.numel(), 0.5)
    assert bits(select.kth_largest_magnitude(x, k)) == bits(reference(x, None, k))
    assert paths == {"one": 0, "two": 1} and counted == []
