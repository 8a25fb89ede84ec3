"""Local tensor reads by size: ``preadv`` into a fresh buffer (the baseline's path) against a
view on a private memory map (``Checkpoint.view``), each followed by what a merge does first
(a float32 copy of the tensor), in CPU seconds per GB, page cache warm.

    python benchmarks/local_reads.py [--repeats 5]

Writes benchmarks/results/local-reads.md; its numbers chose ``reads.MAP_MIN_BYTES``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import speed  # noqa: E402

from amalgam import reads  # noqa: E402
from amalgam.checkpoint import open_checkpoint  # noqa: E402

SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
FILE_BYTES = 256 << 20  # tensors of one size, this many bytes of them per file


def cpu_per_gb(ckpt, names: list[str], mapped: bool) -> float:
    read = ckpt.view if mapped else ckpt.tensor
    start = time.process_time()
    for name in names:
        x = read(name)
        x.float()
        del x
    return (time.process_time() - start) / (FILE_BYTES / 1e9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reads.MAP_MIN_BYTES = 1  # measure the mapped path at every size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            numel = size // 2
            path = Path(tmp) / f"t{size}.safetensors"
            count = FILE_BYTES // size
            save_file(
                {f"t{i:05d}": torch.ones(numel, dtype=torch.bfloat16) for i in range(count)}, path
            )
            with open(path, "rb") as fh:  # warm the page cache
                while fh.read(16 << 20):
                    pass
            with open_checkpoint(str(path)) as ckpt:
                names = ckpt.names()
                runs: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.repeats):  # interleaved
                    for mapped in (False, True):
                        runs[mapped].append(cpu_per_gb(ckpt, names, mapped))
            os.unlink(path)
            pread, mmap = statistics.median(runs[False]), statistics.median(runs[True])
            rows.append(f"| {size >> 10} KiB | {pread:.3f} | {mmap:.3f} | {pread / mmap:.2f} |")
    state = speed.source_state()
    text = "\n".join(
        [
            "# Local tensor reads: preadv against a mapped view",
            "",
            f"`python benchmarks/local_reads.py --repeats {args.repeats}`; {speed.machine()}; "
            f"commit {state['commit']}{' (dirty)' if state['dirty'] else ''}. bf16 tensors of "
            f"one size, {FILE_BYTES >> 20} MiB of them per file, page cache warm; each read "
            "then copied to float32; CPU seconds per GB read, median of interleaved repeats.",
            "",
            "| tensor | preadv + float | view + float | ratio |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    print(text)
    (speed.RESULTS / "local-reads.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
