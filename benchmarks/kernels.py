"""Fused kernels against the torch path: per method and dtype, one 4096x4096 tensor, base + 3.

Both paths run in this process, interleaved, median of ``--repeats``; CPU seconds
(``time.process_time``, all threads) and wall seconds, at each thread count. The torch path is
the same function with ``AMALGAM_FUSED_KERNELS=0``. Also measures the kernels' first-call JIT
cost (in a fresh process: numba's on-disk cache cold, then warm). With ``--baseline DIR`` (a
checkout of another commit, e.g. a ``git worktree``), also DARE's kernels of this tree against
that one's: the l1 norms (``drop_norms``) and a dare_ties merge (base + 3, ``rescale`` exact and
l1) of bf16 tensors, each repeat a fresh process per tree, interleaved, checking both trees give
the same bytes. Writes benchmarks/results/kernels.md.

``--part store`` instead measures the kernels storing bf16 outputs as they compute against
storing float32 then casting (``merge_tensor``'s ``.to``, as before the output dtype reached
the kernels) on a tensor mix (two 4096x4096, one 32000x1024; base + 3), and writes
benchmarks/results/kernels-store.md.

    python benchmarks/kernels.py                  # about 5 minutes on 2 cores
    python benchmarks/kernels.py --size 1024 --repeats 1   # a smoke run
    python benchmarks/kernels.py --baseline /tmp/main-worktree   # plus DARE, about 4 more
    python benchmarks/kernels.py --part store     # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from amalgam.methods.base import MergeContext, TensorParams, get_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # a sibling script, not a package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kernels.md"
STORE_RESULTS = RESULTS.with_name("kernels-store.md")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def params(method: str, models: int) -> TensorParams:
    """The method's defaults, with unequal weights (so every multiply-add rounds)."""
    m = get_method(method)
    shared = {p.name: p.default for p in m.params if not p.per_model}
    per = tuple(
        {p.name: p.default for p in m.params if p.per_model} | {"weight": 0.3 + 0.2 * i}
        for i in range(models)
    )
    return TensorParams(shared, per)


def inputs(size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(size, size, generator=g)
    experts = [base + 0.01 * torch.randn(size, size, generator=g) for _ in range(3)]
    return [t.to(dtype) for t in (base, *experts)]


def timed(fn) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def run(
    method: str, tensors: list[torch.Tensor], fused: bool, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    os.environ["AMALGAM_FUSED_KERNELS"] = "1" if fused else "0"
    m = get_method(method)
    base, models = tensors[0], tensors[1:]
    ctx = MergeContext("w", out_dtype=out_dtype)
    return m.fn(None if method == "linear" else base, models, params(method, 3), ctx)


STORE_SHAPES = ((4096, 4096), (4096, 4096), (32000, 1024))


def store_rows(repeats: int, threads: list[int]) -> list[str]:
    """Per method and thread count: CPU and wall seconds of merging ``STORE_SHAPES`` in bf16 as
    ``merge_tensor`` does, the kernels storing float32 then cast, against storing bf16."""
    mix = []
    for k, (rows, cols) in enumerate(STORE_SHAPES):
        g = torch.Generator().manual_seed(k)
        base = torch.randn(rows, cols, generator=g)
        mix.append([t.to(torch.bfloat16) for t in (base, *(base + 0.01 * torch.randn(
            rows, cols, generator=g) for _ in range(3)))])  # fmt: skip

    def merge(method: str, out_dtype: torch.dtype) -> list[torch.Tensor]:
        return [run(method, t, True, out_dtype).to(torch.bfloat16) for t in mix]

    out = []
    for method in ("linear", "task_arithmetic"):
        for cast, stored in zip(
            merge(method, torch.float32), merge(method, torch.bfloat16), strict=True
        ):
            assert torch.equal(cast.view(torch.int16), stored.view(torch.int16))
        for n in threads:
            torch.set_num_threads(n)
            times: dict[torch.dtype, list[tuple[float, float]]] = {}
            for _ in range(repeats):
                for dtype in (torch.float32, torch.bfloat16):
                    times.setdefault(dtype, []).append(timed(partial(merge, method, dtype)))
            cpu = {d: statistics.median(t[0] for t in ts) for d, ts in times.items()}
            wall = {d: statistics.median(t[1] for t in ts) for d, ts in times.items()}
            a, b = torch.float32, torch.bfloat16
            out.append(
                f"| {method} | {n} | {cpu[a]:.3f} | {cpu[b]:.3f} | {cpu[a] / cpu[b]:.2f}x "
                f"| {wall[a]:.3f} | {wall[b]:.3f} | {wall[a] / wall[b]:.2f}x |"
            )
            print(out[-1], flush=True)
    return out


def jit_cost() -> tuple[float, float]:
    """Seconds of the first ties + linear call in a fresh process: cache cold, then warm."""
    code = (
        "import time, torch; torch.set_num_threads(1); import amalgam.methods;"
        "from benchmarks.kernels import run, inputs; t = inputs(64, torch.bfloat16);"
        "s = time.perf_counter(); run('ties', t, True); run('linear', t, True);"
        "print(time.perf_counter() - s)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"NUMBA_CACHE_DIR": cache, "PYTHONPATH": os.pathsep.join(sys.path)}
        return tuple(  # type: ignore[return-value]
            float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True, cwd=ROOT).stdout)
            for _ in range(2)
        )  # fmt: skip


DARE_SHAPES = ((4096, 4096), (32000, 1024))
# runs in the tree on PYTHONPATH, with only the API both trees have; prints CPU s and a digest
DARE_CHILD = """
import hashlib, json, sys, time, torch
import amalgam.methods
from amalgam.methods.base import MergeContext, TensorParams, get_method
from amalgam.methods.kernels.merge import drop_norms
from amalgam.methods.sparsify import RandomDrop
threads, rows, cols = map(int, sys.argv[1:])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
base = torch.randn(rows, cols, generator=g)
xs = [(base + 0.01 * torch.randn(rows, cols, generator=g)).bfloat16() for _ in range(3)]
base = base.bfloat16()
m = get_method("dare_ties")
def merge(rescale):
    per = tuple({"weight": 0.3 + 0.2 * i, "density": 0.1} for i in range(3))
    p = TensorParams({"lambda": 1.0, "normalize": False, "rescale": rescale,
                      "consensus": "sum"}, per)
    return m.fn(base, xs, p, MergeContext("w")).numpy().tobytes()
cases = {"drop_norms": lambda: repr(drop_norms(xs[0], base, RandomDrop(0.1, 7, "l1"))).encode(),
         "dare_ties exact": lambda: merge("exact"), "dare_ties l1": lambda: merge("l1")}
digests = {k: hashlib.sha1(f()).hexdigest() for k, f in cases.items()}  # compiles
cpu = {}
for k, f in cases.items():
    c = time.process_time()
    f()
    cpu[k] = time.process_time() - c
print(json.dumps([cpu, digests]))
"""


def dare_rows(baseline: Path, repeats: int, threads: list[int]) -> list[str]:
    """Rows of DARE's kernels here against ``baseline``'s: CPU s, medians of interleaved fresh
    processes; raises if the two trees' outputs differ."""
    rows = []
    for shape in DARE_SHAPES:
        for t in threads:
            runs: dict[Path, list[dict[str, float]]] = {baseline: [], ROOT: []}
            digests = {}
            for _ in range(repeats):
                for tree in runs:
                    env = os.environ | {"PYTHONPATH": str(tree)}
                    out = subprocess.run(
                        [sys.executable, "-c", DARE_CHILD, str(t), *map(str, shape)],
                        env=env, capture_output=True, text=True, check=True, cwd=tree,
                    ).stdout  # fmt: skip
                    cpu, digests[tree] = json.loads(out.splitlines()[-1])
                    runs[tree].append(cpu)
            if digests[baseline] != digests[ROOT]:
                raise SystemExit(f"outputs differ from the baseline's at {shape}: {digests}")
            for case in runs[ROOT][0]:
                old, new = (statistics.median(r[case] for r in runs[tr]) for tr in runs)
                rows.append(
                    f"| {case} | {shape[0]}x{shape[1]} | {t} | {old:.3f} | {new:.3f} "
                    f"| {old / new:.2f}x |"
                )
                print(rows[-1], flush=True)
    return rows


def machine() -> str:
    """Commit, CPU model, cores, torch and its ATen capability."""
    return (
        f"{speed.source_state()['commit']}, {speed.cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} (ATen {torch.backends.cpu.get_cpu_capability()})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--part", choices=("merge", "store"), default="merge")
    ap.add_argument("--baseline", type=Path, help="a checkout to time DARE's kernels against")
    args = ap.parse_args()
    import amalgam.methods  # noqa: F401  (registers the methods)

    threads = [int(t) for t in args.threads.split(",")]
    if args.part == "store":
        rows = store_rows(args.repeats, threads)
        STORE_RESULTS.write_text(
            "# Fused kernels storing the output dtype\n\n"
            f"`python benchmarks/kernels.py --part store --repeats {args.repeats}` at "
            f"{machine()}. bf16 tensors 2 x 4096x4096 + 32000x1024, base + 3, method "
            "defaults with weights 0.3/0.5/0.7, each output then `.to(bfloat16)` as "
            "`merge_tensor` does. *cast*: the kernels store float32 and the cast is a second "
            "pass (the route before the output dtype reached them); *stored*: they store bf16 "
            "(the cast is free). Same bytes (checked). Medians of interleaved runs; CPU s: "
            "process CPU time over all threads, summed over the three tensors.\n\n"
            "| method | threads | cast CPU s | stored CPU s | CPU ratio | cast wall s "
            "| stored wall s | wall ratio |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
        return
    cold, warm = jit_cost()
    rows = []
    for name, dtype in DTYPES.items():
        tensors = inputs(args.size, dtype)
        for method in METHODS:
            run(method, tensors, True)  # compile outside the timings
            for n in threads:
                torch.set_num_threads(n)
                times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                for _ in range(args.repeats):
                    for fused in (False, True):
                        call = partial(run, method, tensors, fused)
                        times[fused].append(timed(call))
                cpu = {f: statistics.median(t[0] for t in ts) for f, ts in times.items()}
                wall = {f: statistics.median(t[1] for t in ts) for f, ts in times.items()}
                rows.append(
                    f"| {method} | {name} | {n} | {cpu[False]:.2f} | {cpu[True]:.2f} "
                    f"| {cpu[False] / cpu[True]:.1f}x | {wall[False]:.2f} | {wall[True]:.2f} "
                    f"| {wall[False] / wall[True]:.1f}x |"
                )
                print(rows[-1], flush=True)
    dare = ""
    if args.baseline:
        base_commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=args.baseline,
        ).stdout.strip()  # fmt: skip
        dare = (
            f"\n## DARE's kernels against {base_commit}\n\n"
            f"`--baseline` at {base_commit}: bf16, base + 3, density 0.1, weights 0.3/0.5/0.7; "
            "CPU s of one call, medians of interleaved fresh processes per tree (the same "
            "output bytes in both). drop_norms: the l1 norms of one task vector.\n\n"
            f"| case | shape | threads | {base_commit} CPU s | this tree CPU s | ratio |\n"
            "|---|---|---|---|---|---|\n"
            + "\n".join(dare_rows(args.baseline, args.repeats, threads))
            + "\n"
        )
    RESULTS.write_text(
        "# Fused kernels against the torch path\n\n"
        f"`python benchmarks/kernels.py --size {args.size} --repeats {args.repeats}"
        f"{' --baseline ' + str(args.baseline) if args.baseline else ''}` at "
        f"{machine()}. One {args.size}x{args.size} "
        "tensor, base + 3, method defaults with weights 0.3/0.5/0.7; medians of interleaved "
        "runs. CPU s: process CPU time over all threads.\n\n"
        "| method | dtype | threads | torch CPU s | kernel CPU s | CPU ratio | torch wall s "
        "| kernel wall s | wall ratio |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nFirst kernel calls (ties + linear, bf16) in a fresh process: {cold:.1f} s with "
        f"numba's cache cold (compilation), {warm:.1f} s with it warm.\n" + dare
    )


if __name__ == "__main__":
    main()
