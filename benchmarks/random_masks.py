"""Random-mask micro-benchmark: torch's Mersenne Twister against the counter-based stream.

Draws the DARE keep mask of one 4096 x 4096 tensor block by block (the engine's row blocks of
2^18 entries), on 1 and 2 intra-op threads, in one run: the sequential generator as earlier
releases drew it (one 64-bit word per two entries, both 31-bit halves), and the counter-based
lanes of ``amalgam.methods.counter_random`` (one SplitMix64 hash per two entries). Reports
millions of entries per second for the raw draws and for the whole mask (draw, compare, int8),
best of ``--repeats``, and on CUDA when a device is present.

    python benchmarks/random_masks.py [--rows 4096 --cols 4096] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from amalgam.methods.counter_random import CounterStream, stream_key
from amalgam.methods.sparsify import LANE, row_chunks

RESULTS = Path(__file__).resolve().parent / "results" / "random-masks"


def mt_lanes(generator: torch.Generator, n: int, device: str) -> torch.Tensor:
    """Earlier releases' draw: 64-bit Mersenne Twister words on the CPU, two lanes each."""
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(generator=generator)
    return (words.view(torch.int32)[:n] & (LANE - 1)).to(device)


def keep(drawn: torch.Tensor, cutoff: int) -> torch.Tensor:
    """The 0/1 int8 mask of lanes below ``cutoff`` (as RandomDrop builds it)."""
    return drawn.neg_().add_(cutoff).sign_().clamp_(min=0).to(torch.int8)


def run(draw: Callable[[int, int], torch.Tensor], rows: int, cols: int, mask: bool) -> None:
    cutoff = round(0.1 * LANE)
    for r in row_chunks(rows, cols):
        drawn = draw(r.start * cols, r.stop * cols)
        if mask:
            keep(drawn, cutoff)


def best_seconds(fn: Callable[[], None], repeats: int, sync: bool) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(rows: int, cols: int, repeats: int, device: str, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    key = stream_key(0, "model.layers.0.mlp.up_proj.weight", 0)
    generator = torch.Generator().manual_seed(key & ((1 << 63) - 1))
    streams = {
        "mersenne_twister": lambda a, b: mt_lanes(generator, b - a, device),
        "counter": CounterStream(key, device).lanes,  # as RandomDrop keeps one per tensor
    }
    out = []
    for stage in ("draw", "mask"):
        for name, draw in streams.items():
            run(draw, rows, cols, stage == "mask")  # warm-up
            s = best_seconds(
                lambda d=draw, st=stage: run(d, rows, cols, st == "mask"),
                repeats,
                device == "cuda",
            )
            out.append(
                {
                    "device": device,
                    "threads": threads,
                    "stage": stage,
                    "stream": name,
                    "seconds": s,
                    "M_entries_per_s": rows * cols / s / 1e6,
                }
            )
            print(json.dumps(out[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    for threads in (1, 2):
        rows += measure(args.rows, args.cols, args.repeats, "cpu", threads)
    if torch.cuda.is_available():
        rows += measure(args.rows, args.cols, args.repeats, "cuda", 1)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    report = {"shape": [args.rows, args.cols], "machine": machine, "rows": rows}
    (args.results / "random_masks.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Random masks: {args.rows} x {args.cols}, blocks of 2^18 entries, best of "
        f"{args.repeats}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, 1-minute load "
        f"{machine['load_avg_1m']:.2f} at the end (shared), torch {machine['torch']}"
        + (f", {machine['cuda']}" if machine["cuda"] else ""),
        "",
        "| device | threads | stage | Mersenne Twister M/s | counter-based M/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(0, len(rows), 2):
        mt, ctr = rows[i], rows[i + 1]
        a, b = mt["M_entries_per_s"], ctr["M_entries_per_s"]
        lines.append(
            f"| {mt['device']} | {mt['threads']} | {mt['stage']} "
            f"| {a:.0f} | {b:.0f} | {b / a:.2f}x |"
        )
    (args.results / "random_masks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
