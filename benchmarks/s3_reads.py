"""Reads and merges from S3 (a SeaweedFS server on loopback) against the whole-file download of
the same inputs, this tree's code beside a baseline commit's, interleaved in one run.

    python benchmarks/s3_reads.py --quick                       # ~50M-parameter family
    python benchmarks/s3_reads.py --family DIR/llama-502M-3x    # an existing speed.py family

Each measurement runs in its own process (wall time, CPU seconds and peak RSS from wait4);
the store's CPU seconds meanwhile are read from the server process. The table gives the median
of ``--repeats`` runs. Writes benchmarks/results/s3-reads[-quick].md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import speed  # noqa: E402

from tests.s3server import start_s3_server  # noqa: E402

BASELINE = "9aa7a2c"

DOWNLOAD = """
import json, sys, tempfile, time, s3fs
opts, uris = json.loads(sys.argv[1]), json.loads(sys.argv[2])
fs = s3fs.S3FileSystem(**opts)
with tempfile.TemporaryDirectory(dir=sys.argv[3]) as tmp:
    start = time.perf_counter()
    for i, uri in enumerate(uris):
        fs.get(uri, f"{tmp}/{i}", recursive=True)
    print("BENCH_RESULT " + json.dumps({"seconds": time.perf_counter() - start}))
"""

READER = """
import json, sys, time
from amalgam.checkpoint import open_checkpoint
opts, uris = json.loads(sys.argv[1]), json.loads(sys.argv[2])
start = time.perf_counter()
n = 0
for uri in uris:
    with open_checkpoint(uri, **opts) as ckpt:
        for name in ckpt.names():
            n += ckpt.tensor(name).nbytes
print("BENCH_RESULT " + json.dumps({"seconds": time.perf_counter() - start, "bytes": n}))
"""

IDLE = """
import json, torch
import s3fs
from amalgam.engine import MergeOptions, run_merge
from amalgam.engine.execute import finite
finite(torch.zeros(8, dtype=torch.bfloat16))  # the compiled kernels loaded
print("BENCH_RESULT " + json.dumps({"seconds": 0.0}))
"""

MERGE = """
import json, sys, time
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
opts, uris, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
recipe = parse_recipe({"method": "task_arithmetic", "base": uris[0], "output": out,
                       "models": [{"uri": u} for u in uris[1:]],
                       "storage_options": opts})
start = time.perf_counter()
result = run_merge(recipe, MergeOptions(overwrite=True, device="cpu"))
print("BENCH_RESULT " + json.dumps({"seconds": time.perf_counter() - start,
                                    "engine_s": result.seconds}))
"""


def baseline_tree(work: Path) -> Path:
    """The baseline commit's ``amalgam`` package, extracted (no worktree) under ``work``."""
    src = work / f"src-{BASELINE}"
    if not (src / "amalgam").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(speed.ROOT), "archive", BASELINE, "amalgam"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` so far."""
    times = process.cpu_times()
    return times.user + times.system


def measure(code: str, args: list[str], pythonpath: Path, log: Path, store: psutil.Process) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    before = cpu_seconds(store)
    # -P: the child imports amalgam from PYTHONPATH, never from its working folder
    run = speed.run_child([sys.executable, "-P", "-c", code, *args], log, env)
    if run.returncode != 0:
        raise SystemExit(f"{log}: failed\n{run.output}")
    store_s = cpu_seconds(store) - before
    return {
        **run.info,
        "wall_s": run.wall_s,
        "peak_rss": run.peak_rss,
        "cpu_s": run.cpu_s,
        "store_cpu_s": store_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~50M-parameter family")
    ap.add_argument("--family", type=Path, help="an existing family folder (base, expert1...)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=speed.WORK)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if args.family:
        folders = [args.family / "base"] + [
            args.family / f"expert{i}" for i in range(1, args.experts + 1)
        ]
    else:
        shape = speed.llama_shape(5e7 if args.quick else 0.5e9)
        folders = list(speed.build_family(shape, args.experts, args.work).values())
    store = args.work / f"seaweedfs-{uuid.uuid4().hex[:6]}"
    server = start_s3_server(store)
    weed = psutil.Process(server.process.pid)
    try:
        fs = server.filesystem()
        bucket = server.make_bucket("bench")
        uris = []
        for folder in folders:
            fs.put(str(folder), f"{bucket}/{folder.name}", recursive=True)
            uris.append(f"s3://{bucket}/{folder.name}")
        opts = json.dumps(server.storage_options())
        trees = {"baseline": baseline_tree(args.work), "this tree": speed.ROOT}
        logs = args.work / "s3-logs"
        logs.mkdir(exist_ok=True)
        rows: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.repeats):
            rows.setdefault(("download", "s3fs get"), []).append(
                measure(
                    DOWNLOAD,
                    [opts, json.dumps(uris), str(args.work)],
                    speed.ROOT,
                    logs / f"download-{r}.log",
                    weed,
                )
            )
            for label, tree in trees.items():
                tag = label.replace(" ", "-")
                rows.setdefault(("idle process", label), []).append(
                    measure(IDLE, [], tree, logs / f"idle-{tag}-{r}.log", weed)
                )
                rows.setdefault(("reader", label), []).append(
                    measure(
                        READER, [opts, json.dumps(uris)], tree, logs / f"reader-{tag}-{r}.log", weed
                    )
                )
                for dest, out in (
                    ("S3 -> local", str(args.work / f"merged-{tag}")),
                    ("S3 -> S3", f"s3://{bucket}/merged-{tag}"),
                ):
                    key = ("merge " + dest, label)
                    log = logs / f"merge-{dest[-5:].strip()}-{tag}-{r}.log"
                    rows.setdefault(key, []).append(
                        measure(MERGE, [opts, json.dumps(uris), out], tree, log, weed)
                    )
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)  # the bucket's copies: several times the inputs
    state = speed.source_state()
    total = sum(f.stat().st_size for d in folders for f in speed.weight_files(d))
    lines = [
        f"# Reads and merges from S3 (SeaweedFS on loopback){' (quick)' if args.quick else ''}",
        "",
        f"`python benchmarks/s3_reads.py {' '.join(argv or sys.argv[1:])}`; {speed.machine()};",
        f"commit {state['commit']}{' (dirty)' if state['dirty'] else ''}; baseline {BASELINE}; "
        f"inputs base + {args.experts}, "
        f"{total / 1e9:.2f} GB; median of {args.repeats} interleaved runs, each in its own "
        "process. merge: task_arithmetic, in-engine seconds (whole process in brackets); idle "
        "process: torch, s3fs, the engine and its compiled kernels loaded, nothing read. CPU s: "
        "the measured process's user + system seconds; store CPU s: the SeaweedFS server's "
        "meanwhile (both share this machine's cores).",
        "",
        "| step | code | seconds | GB/s | peak RSS GB | CPU s | store CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (step, label), runs in rows.items():
        secs = statistics.median(x.get("engine_s", x["seconds"]) for x in runs)
        wall = statistics.median(x["wall_s"] for x in runs)
        rss = statistics.median(x["peak_rss"] for x in runs) / 1e9
        rate = f"{total / 1e9 / secs:.2f}" if secs else "-"
        cpu = statistics.median(x["cpu_s"] for x in runs)
        store_cpu = statistics.median(x["store_cpu_s"] for x in runs)
        lines.append(
            f"| {step} | {label} | {secs:.2f} ({wall:.2f}) | {rate} | {rss:.2f} | {cpu:.1f} "
            f"| {store_cpu:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = speed.RESULTS / f"s3-reads{'-quick' if args.quick else ''}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
