"""Scale-out benchmark: one merge on the local executor and on a Ray cluster of 1, 2, 3 nodes.

The speed benchmark's synthetic bf16 Llama (base + 3 experts) is uploaded to SeaweedFS; a Ray
head and worker nodes run in network namespaces of their own (``tests/multinode/cluster.py``),
each node's link capped to the same bandwidth both ways, so that each node added brings its
own storage bandwidth, as in a cloud. The head has no CPUs for Ray: it runs only the driver,
and the node count is the worker count. The local executor runs its driver in the head
namespace, behind the same cap. Each merge is a fresh ``amalgam merge`` process (wall time and
the driver's peak RSS); outputs go to SeaweedFS and every Ray output's commit record (each
file's sha256) must equal the local one. Needs root (network namespaces).

    python benchmarks/scale.py                 # about 0.5B parameters, base + 3
    python benchmarks/scale.py --quick         # a 4M-parameter smoke run, about two minutes
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import speed  # noqa: E402  (a sibling script, not a package)

from amalgam.checkpoint import open_checkpoint  # noqa: E402
from tests.multinode.cluster import Cluster, clean_leftovers, namespaces_usable  # noqa: E402

BUCKET = "scale"
METHODS = {
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2, "trim": "model"},  # whole-model statistics: a pass over all inputs
}
#: --quick: a small vocabulary, or the embeddings alone would make a model of 30M parameters.
QUICK_SHAPE = speed.LlamaShape(
    hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, vocab=4096
)
COMMIT_RECORD = "amalgam-commit.json"
#: The summary line's engine time: "... read in 12.34 s (...)".
ENGINE_SECONDS = re.compile(r" read in ([0-9.]+) s ")


def recipe(method: str, inputs: dict[str, str], shard_bytes: int, cluster: Cluster) -> dict:
    assert cluster.s3 is not None
    return {
        "method": method,
        "base": inputs["base"],
        "models": [{"uri": uri} for label, uri in inputs.items() if label != "base"],
        "params": METHODS[method],
        "dtype": "bfloat16",
        "output": f"s3://{BUCKET}/out/unused",
        "max_shard_size": shard_bytes,
        "storage_options": cluster.s3.storage_options(),
    }


def upload(cluster: Cluster, paths: dict[str, Path]) -> dict[str, str]:
    """Every model folder to ``s3://scale/in/<label>``; returns the URIs."""
    assert cluster.s3 is not None
    fs = cluster.s3.filesystem()
    cluster.s3.make_bucket(BUCKET)
    started = time.perf_counter()
    for label, folder in paths.items():
        fs.put(f"{folder}/", f"{BUCKET}/in/{label}/", recursive=True)
    print(f"uploaded {len(paths)} models in {time.perf_counter() - started:.0f}s", flush=True)
    return {label: f"s3://{BUCKET}/in/{label}" for label in paths}


def hash_inputs(cluster: Cluster, inputs: dict[str, str]) -> None:
    """Each input's content hash, once, into the hash cache of ``$AMALGAM_HOME`` (by the
    objects' ETags), as the fetch stage leaves it: no measured merge reads its inputs twice."""
    assert cluster.s3 is not None
    started = time.perf_counter()
    for uri in inputs.values():
        with open_checkpoint(uri, **cluster.s3.storage_options()) as ckpt:
            ckpt.content_hash()
    print(f"hashed {len(inputs)} inputs in {time.perf_counter() - started:.0f}s", flush=True)


def merge(cluster: Cluster, cfg: Path, output: str, executor: str, log: Path) -> dict[str, Any]:
    """``amalgam merge`` in the head namespace: wall time, driver peak RSS, engine seconds,
    the bytes each node received over its link."""
    env = cluster.driver_env({"TQDM_DISABLE": "1"})
    args = [sys.executable, "-m", "amalgam.cli", "merge", str(cfg), "--executor", executor]
    args += ["--output", output, "--overwrite", "--device", "cpu"]
    before = {name: node.bytes_received() for name, node in cluster.nodes.items()}
    run = speed.run_child(cluster.command("head", args), log, env)
    if run.returncode:
        raise SystemExit(f"{executor} merge failed ({log}):\n{run.output}")
    engine = ENGINE_SECONDS.search(log.read_text(errors="replace"))
    return {
        "wall_s": run.wall_s,
        "engine_s": float(engine.group(1)) if engine else None,
        "driver_peak_rss": run.peak_rss,
        "received": {n: node.bytes_received() - before[n] for n, node in cluster.nodes.items()},
        "files": committed(cluster, output),
    }


def committed(cluster: Cluster, output: str) -> dict[str, Any]:
    """The output's commit record: every file with its size and sha256."""
    assert cluster.s3 is not None
    fs = cluster.s3.filesystem()
    fs.invalidate_cache()
    record = json.loads(fs.cat_file(f"{output.removeprefix('s3://')}/{COMMIT_RECORD}"))
    return record["files"]


def measure(args: argparse.Namespace, paths: dict[str, Path], root: Path, result: dict) -> None:
    """Every run of the benchmark on one cluster: the local executor first, then Ray with one
    more worker node started before each round. Results are written after every run."""
    runs = args.work / "scale-runs"
    runs.mkdir(parents=True, exist_ok=True)
    stem = "scale-quick" if args.quick else "scale"
    clean_leftovers()
    cluster = Cluster(root)
    try:
        t0 = time.perf_counter()
        cluster.create_network(args.nodes)
        cluster.start_s3()
        for name in cluster.nodes:
            cluster.limit(name, args.cap)
        cluster.start_ray("head", 0)
        cluster.wait_nodes(1)
        result["cluster_start_s"] = time.perf_counter() - t0
        inputs = upload(cluster, paths)
        hash_inputs(cluster, inputs)
        cfgs = {}
        for method in METHODS:
            cfgs[method] = runs / f"{method}.yaml"
            body = recipe(method, inputs, args.max_shard_size, cluster)
            cfgs[method].write_text(yaml.safe_dump(body))
        results: dict[str, dict[str, Any]] = result.setdefault("results", {})
        for method, cfg in cfgs.items():
            out = f"s3://{BUCKET}/out/{method}-local"
            local = merge(cluster, cfg, out, "local", runs / f"{method}-local.log")
            results[method] = {"local": local}
            result["shards"] = sum(name.endswith(".safetensors") for name in local["files"])
            print(f"{method} local: {local['wall_s']:.1f}s", flush=True)
            speed.write_results(stem, result, markdown(result))
        for n in range(1, args.nodes + 1):
            cluster.start_ray(f"w{n}", args.cpus_per_node)
            cluster.wait_nodes(n + 1)
            for method, cfg in cfgs.items():
                out, key = f"s3://{BUCKET}/out/{method}-ray{n}", f"ray{n}"
                run = merge(cluster, cfg, out, "ray", runs / f"{method}-{key}.log")
                run["identical"] = run["files"] == results[method]["local"]["files"]
                results[method][key] = run
                print(f"{method} ray x{n}: {run['wall_s']:.1f}s", flush=True)
                speed.write_results(stem, result, markdown(result))
    finally:
        cluster.close()


def read_bound(result: dict[str, Any], nodes: int) -> float:
    """Seconds to read every input once through ``nodes`` capped links."""
    return result["input_bytes"] / (result["cap_mb_s"] * 1e6 * nodes)


def markdown(result: dict[str, Any]) -> str:
    shape, cap = result["shape"], result["cap_mb_s"]
    lines = [
        f"Scale-out: base + {result['experts']} synthetic bf16 Llamas of "
        f"{result['params'] / 1e6:.0f}M parameters ({shape['layers']} layers, hidden "
        f"{shape['hidden']}; {result['input_bytes'] / 1e9:.2f} GB of inputs), on SeaweedFS; "
        f"every node's link capped at {cap:g} MB/s each way (`tc` tbf on both veth ends); "
        f"output shards of at most {result['max_shard_size'] / 1e6:.0f} MB ({result['shards']} "
        "shards, each cut into Ray tasks of 256 MiB of inputs); Ray workers "
        f"with {result['cpus_per_node']} CPU each, head with none (it runs the driver only). "
        f"{result['machine']}; amalgam {result['amalgam']['commit']}.",
        "",
        "| method | executor | nodes | wall s | engine s | read bound s | speed-up (wall) | "
        "x nodes | GB in, driver | GB in, workers | driver peak RSS MB | output = local |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method, runs in result["results"].items():
        base = runs["local"]["wall_s"]
        for key, r in runs.items():
            nodes = 1 if key == "local" else int(key.removeprefix("ray"))
            speedup = base / r["wall_s"]
            engine = "" if r["engine_s"] is None else f"{r['engine_s']:.1f}"
            same = "(reference)" if key == "local" else ("yes" if r["identical"] else "**no**")
            driver = r["received"]["head"]
            workers = sum(v for name, v in r["received"].items() if name != "head")
            lines.append(
                f"| {method} | {'local' if key == 'local' else 'ray'} | {nodes} | "
                f"{r['wall_s']:.1f} | {engine} | {read_bound(result, nodes):.0f} | "
                f"{speedup:.2f} | {speedup / nodes:.2f} | {driver / 1e9:.2f} | "
                f"{workers / 1e9:.2f} | {r['driver_peak_rss'] / 1e6:.0f} | {same} |"
            )
    lines += [
        "",
        f"Read bound: the inputs ({result['input_bytes'] / 1e9:.2f} GB) read once through "
        f"`nodes` links of {cap:g} MB/s; the output goes back through the same links. "
        "GB in: what the head namespace (the driver) and the worker namespaces received over "
        "their links during the merge (S3 reads, Ray traffic). "
        f"Cluster start (bridge, namespaces, SeaweedFS, Ray head): "
        f"{result['cluster_start_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=0.5e9, help="parameters per model")
    ap.add_argument("--experts", type=int, default=3, help="fine-tuned models besides the base")
    ap.add_argument("--quick", action="store_true", help="a 4M-parameter smoke run")
    ap.add_argument("--nodes", type=int, default=3, help="the most Ray worker nodes")
    ap.add_argument("--cpus-per-node", type=int, default=1, help="Ray CPUs of a worker node")
    ap.add_argument("--cap", type=float, default=40.0, help="each node's link, MB/s each way")
    ap.add_argument(
        "--max-shard-size",
        type=int,
        default=50 * 10**6,
        help="output shard bytes (with one Ray task per shard: the work units)",
    )
    ap.add_argument("--work", type=Path, default=speed.WORK)
    args = ap.parse_args(argv)
    # a plain `kill` still runs the cleanup: namespaces, bridge, SeaweedFS, Ray
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reason = namespaces_usable()
    if reason:
        raise SystemExit(f"error: the scale benchmark needs network namespaces: {reason}")
    if args.quick:
        args.cap, args.max_shard_size = min(args.cap, 20.0), min(args.max_shard_size, 2 * 10**6)
    shape = QUICK_SHAPE if args.quick else speed.llama_shape(args.params)
    paths = speed.build_family(shape, args.experts, args.work)
    result: dict[str, Any] = {
        "params": shape.params,
        "shape": asdict(shape),
        "experts": args.experts,
        "input_bytes": sum(f.stat().st_size for p in paths.values() for f in speed.weight_files(p)),
        "cap_mb_s": args.cap,
        "max_shard_size": args.max_shard_size,
        "cpus_per_node": args.cpus_per_node,
        "machine": speed.machine(),
        "amalgam": speed.source_state(),
    }
    # a short path: SeaweedFS and Ray put unix sockets in it (107-byte limit)
    with tempfile.TemporaryDirectory(prefix="scale-", dir="/tmp") as root:
        measure(args, paths, Path(root), result)
    broken = [
        f"{method} {key}"
        for method, runs in result["results"].items()
        for key, r in runs.items()
        if key != "local" and not r["identical"]
    ]
    if broken:
        print(f"error: Ray output differs from the local executor's: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
