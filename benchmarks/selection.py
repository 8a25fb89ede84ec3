"""Exact top-k threshold of a task vector: main's two-pass radix kernel against the one pass.

Times, in CPU seconds (``time.process_time``, median of interleaved repeats) and wall seconds,
(1) the k-th largest |x - base| of one bf16 task vector (Gaussian deltas; and deltas whose rows
have log-normal scales, as fine-tunes' rows differ) at densities 0.2 and 0.5: main's
(9aa7a2c) two-pass radix selection (its histogram kernel, copied here for the baseline only),
this tree's two-pass selection (``select.two_pass``, the fallback) and
``select.kth_largest_magnitude`` (the sampled bracket and one pass); (2) the TIES merge of that
tensor, base + 3 models, with main's threshold and with this tree's. 1 and 2 threads
(``torch.set_num_threads``: the kernels' thread pool follows it). Every case's value is
checked equal first (threshold bits; TIES output bytes).
Writes benchmarks/results/selection.md.

    python benchmarks/selection.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit

from amalgam.methods import ties
from amalgam.methods.base import MergeContext, get_method
from amalgam.methods.kernels import launch, select
from amalgam.methods.kernels.blocks import ABS, BINS, COUNT_CHUNK, HALF, LOW16
from amalgam.methods.kernels.scalar import as_f32, f32_bits
from amalgam.methods.params import resolve_params
from amalgam.methods.sparsify import keep_count
from amalgam.recipe import parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # a sibling script, not a package

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "selection.md"
# (rows, columns, sigma): the deltas' rows scaled by exp(N(0, sigma^2)), as fine-tunes' rows differ
CASES = ((4096, 4096, 0.0), (32000, 1024, 0.0), (4096, 4096, 1.0))
DENSITIES = (0.2, 0.5)


@njit(nogil=True, cache=True, inline="always")
def main_bits(x, base, e):
    """main's (9aa7a2c) ``blocks.magnitude_bits``: one magnitude, indexing the whole arrays."""
    v = as_f32(x[e]) if base is None else as_f32(x[e]) - as_f32(base[e])
    return f32_bits(v) & ABS


@njit(nogil=True, cache=True)
def main_counts(x, base, high, start, stop):
    """main's (9aa7a2c) ``blocks.magnitude_counts``, unchanged (for the baseline only)."""
    counts = np.zeros(BINS, np.int64)
    scratch = np.zeros(BINS, np.int32)
    for s in range(start, stop, COUNT_CHUNK):
        e = min(s + COUNT_CHUNK, stop)
        scratch[:] = 0
        if high < 0:
            for i in range(s, e):
                scratch[main_bits(x, base, i) >> HALF] += 1
        else:
            wanted = np.uint32(high)
            for i in range(s, e):
                m = main_bits(x, base, i)
                if m >> HALF == wanted:
                    scratch[m & LOW16] += 1
        counts += scratch
    return counts


def main_histogram(xs: np.ndarray, bs: np.ndarray, high: int) -> np.ndarray:
    parts: dict[int, np.ndarray] = {}

    def count(start: int, stop: int) -> None:
        parts[start] = main_counts(xs, bs, high, start, stop)

    launch.run_ranges(count, xs.size)
    return sum(parts[s] for s in sorted(parts))


def main_kth(x: torch.Tensor, k: int, base: torch.Tensor) -> float:
    """main's ``kth_largest_magnitude``: two histogram passes over x and base."""
    xs, bs = launch.entries(x), launch.entries(base)
    high, above = select.top_bin(main_histogram(xs, bs, -1), k)
    low, _ = select.top_bin(main_histogram(xs, bs, high), k - above)
    return select.as_float((high << 16) | low)


def main_threshold(x: torch.Tensor, base: torch.Tensor, density: float) -> float | None:
    """main's per-tensor TIES threshold (``sparsify.delta_threshold`` on the kernel path)."""
    if density >= 1.0 or x.numel() == 0:
        return None
    return main_kth(x, keep_count(x.numel(), density), base)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def ties_with(
    threshold: Callable, base: torch.Tensor, models: list[torch.Tensor], density: float
) -> torch.Tensor:
    """The TIES merge (per-tensor trim at ``density``) with ``threshold`` as its threshold."""
    kept = ties.delta_threshold
    ties.delta_threshold = threshold
    try:
        recipe = parse_recipe(
            {
                "method": "ties",
                "base": "base",
                "models": [{"uri": f"m{i}"} for i in range(len(models))],
                "params": {"density": density},
            }
        )
        spec = get_method("ties")
        p = resolve_params(recipe, spec, "w", 1)
        return spec.fn(base, models, p, MergeContext(name="w", layer=None, seed=0, stats={}))
    finally:
        ties.delta_threshold = kept


def measure(
    base: torch.Tensor, models: list[torch.Tensor], density: float, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (CPU s, wall s) of each case, repeats interleaved; values checked equal first."""
    x, k = models[0], keep_count(base.numel(), density)
    kth = {
        "kth main": partial(main_kth, x, k, base),
        "kth two-pass": lambda: select.as_float(select.two_pass(x, base, k)),
        "kth one-pass": partial(select.kth_largest_magnitude, x, k, base),
    }
    merges = {
        "ties main": partial(ties_with, main_threshold, base, models, density),
        "ties now": partial(ties_with, ties.delta_threshold, base, models, density),
    }
    # warm every case (numba's compile, torch's allocator), and check they agree
    assert len({fn() for fn in kth.values()}) == 1
    assert torch.equal(merges["ties main"](), merges["ties now"]())
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in kth | merges}
    for _ in range(repeats):
        for name, fn in (kth | merges).items():
            samples[name].append(timed(fn))
    return {
        name: tuple(statistics.median(column) for column in zip(*got, strict=True))
        for name, got in samples.items()
    }


def run(repeats: int) -> tuple[list[str], list[str]]:
    kth_rows, ties_rows = [], []
    g = torch.Generator().manual_seed(0)
    for rows, cols, sigma in CASES:
        base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
        models = [
            (
                base.float()
                + torch.randn(rows, cols, generator=g)
                * 1e-3
                * torch.exp(sigma * torch.randn(rows, 1, generator=g))
            ).to(torch.bfloat16)
            for _ in range(3)
        ]
        name = f"{rows}x{cols} bf16" + (f", rows scaled (sigma {sigma})" if sigma else "")
        for density in DENSITIES:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                med = measure(base, models, density, repeats)
                head = f"| {name} | {density} | {threads} |"
                old, two, one = med["kth main"], med["kth two-pass"], med["kth one-pass"]
                kth_rows.append(
                    f"{head} {old[0]:.4f} | {two[0]:.4f} | {one[0]:.4f} | "
                    f"{old[0] / one[0]:.2f}x | {two[0] / one[0]:.2f}x | "
                    f"{old[1]:.4f} | {one[1]:.4f} |"
                )
                old, new = med["ties main"], med["ties now"]
                ties_rows.append(
                    f"{head} {old[0]:.3f} | {new[0]:.3f} | {old[0] / new[0]:.2f}x | "
                    f"{old[1]:.3f} | {new[1]:.3f} |"
                )
                print(kth_rows[-1], ties_rows[-1], sep="\n", flush=True)
    return kth_rows, ties_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu, commit = speed.cpu_model(), speed.source_state()["commit"]
    kth_rows, ties_rows = run(args.repeats)
    RESULTS.write_text(
        "# Exact top-k threshold: main's two-pass radix kernel vs the one pass\n\n"
        f"`python benchmarks/selection.py --repeats {args.repeats}` at {commit}, {cpu}, "
        f"numba {numba.__version__}, torch {torch.__version__}. Median of {args.repeats} "
        "interleaved repeats; CPU s = process CPU seconds (all threads), wall s on a machine "
        "shared with other jobs (noisy). Values checked equal in every row (threshold bits; "
        "TIES output bytes).\n\n"
        "## k-th largest |x - base| of one bf16 task vector\n\n"
        "main: 9aa7a2c's two-pass kernel (a copy in the script); two-pass: this tree's "
        "(`select.two_pass`, the fallback); one-pass: `select.kth_largest_magnitude`.\n\n"
        "| tensor | density | threads | main CPU s | two-pass CPU s | one-pass CPU s | "
        "vs main | vs two-pass | main wall s | one-pass wall s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(kth_rows) + "\n\n"
        "## TIES merge of that tensor, base + 3 (fused merge kernel in both columns)\n\n"
        "| tensor | density | threads | main CPU s | now CPU s | speed-up | main wall s | "
        "now wall s |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(ties_rows) + "\n"
    )


if __name__ == "__main__":
    main()
