"""CUDA timing: host-device bandwidth, and the speed benchmark's merges on the CPU and on a GPU
against the transfer bound, with the GPU's outputs compared to the CPU's byte for byte.

Run by ``cuda_check.py --timing-params 0.5e9`` (with ``--timing-only``, nothing else). The
family is ``speed.py``'s (a bf16 Llama of that many parameters, base + 3, cached under
``benchmarks/.work/``), and so are the four merge configs (mergekit YAML read through
``amalgam.mergekit_compat``). Each merge runs in this process, best of two, in-engine seconds
(``MergeResult.seconds``), with a warm page cache:

- on the CPU (every core);
- on the GPU with synchronous copies (``AMALGAM_CUDA_OVERLAP=0``: pageable ``.to(device)`` on
  the merge thread, as earlier releases did);
- on the GPU with the overlapped copies (pinned memory, a copy stream, ``engine/transfer.py``).

Bounds, per method, for the bytes it reads: the read bound (amalgam's reader over every input
tensor, warm cache: ``speed.read_bound``) and the transfer bound (those bytes over the pinned
host-to-device bandwidth measured here). A GPU merge cannot beat the larger of the two.
Without a GPU (``--devices cpu,cpu``) the same rows run with the second device on the CPU and
the bandwidth columns are empty.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from amalgam.engine import MergeOptions, run_merge
from amalgam.mergekit_compat import translate
from amalgam.recipe import parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # a sibling script, not a package

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
BANDWIDTH_BYTES = 1 << 28  # the buffer each bandwidth figure copies


def bandwidth(device: str, repeats: int = 3) -> dict[str, float]:
    """GB/s from pageable and pinned host memory to ``device`` and back into pinned memory,
    best of ``repeats`` (empty for a CPU device)."""
    if torch.device(device).type != "cuda":
        return {}
    pageable = torch.empty(BANDWIDTH_BYTES, dtype=torch.uint8).fill_(1)
    pinned = pageable.pin_memory()
    on_device = torch.empty(BANDWIDTH_BYTES, dtype=torch.uint8, device=device)

    def best(dst: torch.Tensor, src: torch.Tensor) -> float:
        seconds = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return BANDWIDTH_BYTES / 1e9 / min(seconds)

    return {
        "h2d_pageable_gb_s": best(on_device, pageable),
        "h2d_pinned_gb_s": best(on_device, pinned),
        "d2h_pinned_gb_s": best(pinned, on_device),
    }


def merge_seconds(
    method: str, paths: dict[str, Path], out: Path, device: str, overlap: bool
) -> float:
    """In-engine seconds of ``method``'s speed config merged on ``device`` into ``out``."""
    data = translate(speed.mergekit_config(method, paths, "float32"), "mergekit config")
    recipe = parse_recipe({**data, "output": str(out)})
    with patch.dict(os.environ, {"AMALGAM_CUDA_OVERLAP": "1" if overlap else "0"}):
        return run_merge(recipe, MergeOptions(device=device, overwrite=True)).seconds


def run(
    devices: list[str],
    params: float,
    work: Path,
    compare: Callable[[Path, Path], Any],
    repeats: int = 2,
) -> dict[str, Any]:
    """Bandwidth, bounds and merge times on ``devices`` (the CPU first, then the GPU); outputs
    compared by ``compare`` (``cuda_check.compare_folders``: a dataclass with ``identical``,
    ``tensors`` and ``max_ulps``)."""
    cpu, gpu = devices
    paths = speed.build_family(speed.llama_shape(params), 3, work / "family")
    bound = speed.read_bound(list(paths.values()))
    bw = bandwidth(gpu)
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for method in METHODS:
            used = [p for label, p in paths.items() if method != "linear" or label != "base"]
            nbytes = sum(f.stat().st_size for p in used for f in speed.weight_files(p))
            outs = {mode: Path(tmp) / f"{method}-{mode}" for mode in ("cpu", "sync", "overlap")}
            runs = {"cpu": (cpu, True), "sync": (gpu, False), "overlap": (gpu, True)}
            seconds = {
                mode: min(
                    merge_seconds(method, paths, outs[mode], device, overlap)
                    for _ in range(repeats)
                )
                for mode, (device, overlap) in runs.items()
            }
            transfer = nbytes / 1e9 / bw["h2d_pinned_gb_s"] if bw else None
            rows.append(
                {
                    "method": method,
                    "input_gb": nbytes / 1e9,
                    "read_bound_s": bound.seconds_for(nbytes),
                    "transfer_bound_s": transfer,
                    **{f"{mode}_s": s for mode, s in seconds.items()},
                    "overlap_vs_sync": asdict(compare(outs["overlap"], outs["sync"])),
                    "overlap_vs_cpu": asdict(compare(outs["overlap"], outs["cpu"])),
                }
            )
            print(f"timing {method}: {seconds}", flush=True)
    return {
        "devices": devices,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": speed.cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": speed.llama_shape(params).params,
        **speed.source_state(),
        **bw,
        "rows": rows,
    }


def failures(result: dict[str, Any], max_ulps: float) -> list[str]:
    """Rows whose overlapped copies changed a byte, or whose GPU output is more than
    ``max_ulps`` from the CPU's."""
    return [
        f"timing {r['method']}"
        for r in result["rows"]
        if r["overlap_vs_sync"]["identical"] < r["overlap_vs_sync"]["tensors"]
        or r["overlap_vs_cpu"]["max_ulps"] > max_ulps
    ]


def markdown(result: dict[str, Any]) -> str:
    """The timing table, its machine and bandwidth."""
    bw = (
        f"H2D {result['h2d_pageable_gb_s']:.1f} GB/s pageable, "
        f"{result['h2d_pinned_gb_s']:.1f} GB/s pinned; "
        f"D2H pinned {result['d2h_pinned_gb_s']:.1f} GB/s"
        if "h2d_pinned_gb_s" in result
        else "no CUDA device: the second device is the CPU, no bandwidth"
    )
    lines = [
        f"CUDA timing on {result['gpu'] or result['devices'][1]} (host: {result['cpu']}, "
        f"{result['threads']} threads, torch {result['torch']}), amalgam {result['commit']}"
        + (" with local changes" if result["dirty"] else "")
        + f"; bf16 Llama of {result['params'] / 1e6:.0f}M parameters, base + 3. {bw}.",
        "",
        "| method | input GB | read bound s | transfer bound s | cpu s | cuda sync s | "
        "cuda overlapped s | overlapped x max bound | overlapped = sync | overlapped = cpu |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        bound = max(r["read_bound_s"], r["transfer_bound_s"] or 0.0)
        same = " | ".join(
            f"{c['identical']}/{c['tensors']}"
            + (f" (max {c['max_ulps']:.2g} ulp)" if c["identical"] < c["tensors"] else "")
            for c in (r["overlap_vs_sync"], r["overlap_vs_cpu"])
        )
        transfer = speed.fmt(r["transfer_bound_s"], ".2f")
        lines.append(
            f"| {r['method']} | {r['input_gb']:.2f} | {r['read_bound_s']:.2f} | {transfer} | "
            f"{r['cpu_s']:.2f} | {r['sync_s']:.2f} | {r['overlap_s']:.2f} | "
            f"{r['overlap_s'] / bound:.1f}x | {same} |"
        )
    return "\n".join(lines)
