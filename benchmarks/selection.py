"""Exact top-k threshold of a task vector: main's torch path against the fused numba kernel.

Times, in CPU seconds (``time.process_time``, median of interleaved repeats) and wall seconds,
(1) the k-th largest |x - base| of one bf16 tensor: main's path (float32 task vector, abs, two
``torch.bincount`` radix passes; a copy kept in this script) against
``kernels.select.kth_largest_magnitude``; (2) the TIES merge of that tensor, base + 3 models,
with main's threshold and with the kernel's. 1 and 2 threads (``torch.set_num_threads``: the
kernels' thread pool follows it).
Writes benchmarks/results/selection.md.

    python benchmarks/selection.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numba
import torch

from amalgam.methods import ties
from amalgam.methods.base import MergeContext, get_method
from amalgam.methods.kernels import select
from amalgam.methods.params import resolve_params
from amalgam.methods.sparsify import keep_count, kth_largest
from amalgam.recipe import parse_recipe

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "selection.md"
SHAPES = ((4096, 4096), (32000, 1024))
DENSITY = 0.2


def main_kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """main's (8105363) radix selection over float32 magnitudes: ``kth_largest``'s torch path
    (the kernels switched off), for the baseline only."""
    before = os.environ.get("AMALGAM_FUSED_KERNELS")
    os.environ["AMALGAM_FUSED_KERNELS"] = "0"
    try:
        return kth_largest(magnitudes, k)
    finally:
        if before is None:
            del os.environ["AMALGAM_FUSED_KERNELS"]
        else:
            os.environ["AMALGAM_FUSED_KERNELS"] = before


def main_threshold(x: torch.Tensor, base: torch.Tensor, density: float) -> float | None:
    """main's per-tensor TIES threshold: the whole float32 task vector, then its k-th largest."""
    if density >= 1.0 or x.numel() == 0:
        return None
    return main_kth_largest(torch.sub(x, base.float()).abs_(), keep_count(x.numel(), density))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def ties_with(threshold: Callable, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """The TIES merge with ``threshold`` as its per-tensor threshold."""
    kept = ties.delta_threshold
    ties.delta_threshold = threshold
    try:
        return ties_merge(base, models)
    finally:
        ties.delta_threshold = kept


def ties_merge(base: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    recipe = parse_recipe(
        {
            "method": "ties",
            "base": "base",
            "models": [{"uri": f"m{i}"} for i in range(len(inputs))],
            "params": {"density": DENSITY},
        }
    )
    spec = get_method("ties")
    p = resolve_params(recipe, spec, "w", 1)
    return spec.fn(base, inputs, p, MergeContext(name="w", layer=None, seed=0, stats={}))


def measure(base: torch.Tensor, models: list[torch.Tensor], repeats: int) -> dict[str, tuple]:
    """Median (CPU s, wall s) of each case, repeats interleaved; outputs checked equal first."""
    x, k = models[0], keep_count(base.numel(), DENSITY)
    fused = ties.delta_threshold
    cases = {
        "kth old": partial(main_threshold, x, base, DENSITY),
        "kth fused": partial(select.kth_largest_magnitude, x, k, base),
        "ties old": partial(ties_with, main_threshold, base, models),
        "ties fused": partial(ties_with, fused, base, models),
    }
    # warm both (numba's compile, torch's allocator), and check they agree
    assert cases["kth old"]() == cases["kth fused"]()
    assert torch.equal(cases["ties old"](), cases["ties fused"]())
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {
        name: tuple(statistics.median(column) for column in zip(*got, strict=True))
        for name, got in samples.items()
    }


def run(repeats: int) -> list[str]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        models = [
            (base.float() + torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16)
            for _ in range(3)
        ]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            med = measure(base, models, repeats)
            for what, label in (("kth", "k-th largest"), ("ties", "ties merge, base + 3")):
                old, new = med[f"{what} old"], med[f"{what} fused"]
                rows.append(
                    f"| {shape[0]}x{shape[1]} bf16 | {label} | {threads} | {old[0]:.3f} | "
                    f"{new[0]:.3f} | {old[0] / new[0]:.2f}x | {old[1]:.3f} | {new[1]:.3f} |"
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    rows = run(args.repeats)
    RESULTS.write_text(
        "# Exact top-k threshold: main's torch path vs the fused kernel\n\n"
        f"`python benchmarks/selection.py --repeats {args.repeats}` at {commit}, {cpu}, "
        f"numba {numba.__version__}, torch {torch.__version__}; density {DENSITY}. "
        f"Median of {args.repeats} interleaved repeats; CPU s = process CPU seconds (all "
        "threads), wall s on a machine shared with other jobs (noisy). Outputs checked equal "
        "(threshold bits; TIES output bytes).\n\n"
        "| tensor | what | threads | old CPU s | fused CPU s | CPU speed-up | old wall s | "
        "fused wall s |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
