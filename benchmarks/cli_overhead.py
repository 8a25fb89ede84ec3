"""What `amalgam merge` costs besides the merge itself: the command's wall time against the
engine's own time (the `in X s` it prints), with the inputs' content hashes cold (a fresh
$AMALGAM_HOME, as on a first merge) and warm (cached by file stamp), and `amalgam --help`.

The same synthetic Llama family as benchmarks/speed.py (base + experts, bf16, linear over the
experts as there). With ``--before REV`` the commit REV is exported beside this tree and both
are measured in the same run, interleaved, each measurement repeated (medians reported):

    python benchmarks/cli_overhead.py --before main --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # benchmarks/ is no package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the console script of a tree: ``entry`` where it has one (it skips Python's teardown), else
#: ``main`` (older trees)
LAUNCH = (
    "import sys; sys.argv[0] = 'amalgam'; from amalgam_flows import cli; "
    "getattr(cli, 'entry', cli.main)()"
)
ENGINE_SECONDS = re.compile(r" read in ([0-9.]+) s ")


def export_tree(rev: str, work: Path) -> Path:
    """``git archive`` of ``rev`` into ``work/tree-<sha>`` (reused when there)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = work / f"tree-{sha[:12]}"
    if not (tree / "amalgam").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def tree_env(tree: Path, work: Path) -> dict[str, str]:
    """An environment whose `amalgam` packages are ``tree``'s (flows and tasks linked under
    their installed names)."""
    links = work / f"links-{tree.name}"
    links.mkdir(parents=True, exist_ok=True)
    for name, folder in (("amalgam_flows", "flows"), ("amalgam_stage_tasks", "tasks")):
        link = links / name
        if not link.is_symlink():
            link.symlink_to(tree / folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": f"{tree}:{links}", "TOKENIZERS_PARALLELISM": "false"}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall and CPU (user + system) seconds of ``amalgam ARGS`` in a fresh process, and its
    stdout. CPU seconds hardly depend on what else runs on the machine; wall seconds do."""
    cpu = children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"amalgam {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return wall, children_cpu() - cpu, done.stdout


def merge_once(cfg: Path, out: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, engine s, CPU s) of one `amalgam merge`."""
    wall, cpu, stdout = timed(["merge", str(cfg), "--output", str(out), "--overwrite"], env)
    match = ENGINE_SECONDS.search(stdout)
    if match is None:
        raise SystemExit(f"no engine time in: {stdout}")
    return wall, float(match.group(1)), cpu


def measure(trees: dict[str, Path], cfg: Path, work: Path, repeats: int) -> dict[str, dict]:
    """Per tree, lists of: help (wall, CPU), cold and warm merges (wall, engine, CPU)."""
    runs: dict[str, dict] = {label: {"help": [], "cold": [], "warm": []} for label in trees}
    for i in range(repeats):
        for label, tree in trees.items():
            env = tree_env(tree, work)
            runs[label]["help"].append(timed(["--help"], env)[:2])
            with tempfile.TemporaryDirectory(dir=work) as home:
                env["AMALGAM_HOME"] = home  # no cached hash: the first merge of these inputs
                out = work / "out"
                runs[label]["cold"].append(merge_once(cfg, out, env))
                runs[label]["warm"].append(merge_once(cfg, out, env))
            print(f"repeat {i + 1}/{repeats} {label}: {runs[label]}", file=sys.stderr)
    return runs


def summary(runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Medians: help's wall, and per cold/warm the wall, engine, outside-the-engine and CPU
    seconds."""
    rows = {}
    for label, r in runs.items():
        row = {"help_s": statistics.median(w for w, _ in r["help"])}
        for kind in ("cold", "warm"):
            row[f"{kind}_wall_s"] = statistics.median(w for w, _, _ in r[kind])
            row[f"{kind}_engine_s"] = statistics.median(e for _, e, _ in r[kind])
            row[f"{kind}_outside_s"] = statistics.median(w - e for w, e, _ in r[kind])
            row[f"{kind}_cpu_s"] = statistics.median(c for _, _, c in r[kind])
        rows[label] = row
    return rows


def markdown(result: dict) -> str:
    rows = result["summary"]
    lines = [
        "# `amalgam merge`: the command's own cost beside the merge\n",
        f"`python benchmarks/cli_overhead.py {' '.join(result['argv'])}`, {result['date']}, "
        f"{result['machine']}; load average {result['load_before']} before, "
        f"{result['load_after']} after (a shared machine: medians of {result['repeats']} "
        "interleaved repeats).\n",
        f"Inputs: {result['inputs']}. Trees: "
        + ", ".join(f"`{k}` = {v}" for k, v in result["trees"].items())
        + ".\n",
        "cold: a fresh `$AMALGAM_HOME`, so the merge hashes its inputs (a first merge); warm: "
        "the same merge again (hashes cached by file stamp). `engine` is the time the merge "
        "prints (`run_merge`, hashing included); `outside` is wall minus engine: interpreter "
        "start, imports, output and exit; `CPU` is the process's user + system seconds "
        "(less sensitive to the machine's load than wall time).\n",
        "| tree | `--help` s | cold wall s | cold engine s | cold outside s | cold CPU s "
        "| warm wall s | warm engine s | warm outside s | warm CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ("help_s", "cold_wall_s", "cold_engine_s", "cold_outside_s", "cold_cpu_s")
    keys += ("warm_wall_s", "warm_engine_s", "warm_outside_s", "warm_cpu_s")
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1e8, help="parameters per model")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", help="a commit to measure beside this tree, e.g. main")
    ap.add_argument("--work", type=Path, default=speed.WORK)
    ap.add_argument("--results", type=Path, default=RESULTS / "cli-overhead.md")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = speed.build_family(speed.llama_shape(args.params), args.experts, args.work)
    cfg = args.work / "cli-overhead-linear.yaml"
    cfg.write_text(yaml.safe_dump(speed.mergekit_config("linear", paths, "float32")))
    trees = {}
    if args.before:
        trees[f"before ({args.before})"] = export_tree(args.before, args.work)
    trees["this tree"] = ROOT
    described = {label: str(tree) for label, tree in trees.items()}
    state = speed.source_state()
    described["this tree"] = f"{state.get('commit', '?')[:12]}" + (
        " with local changes" if state.get("dirty") else ""
    )
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    runs = measure(trees, cfg, args.work, args.repeats)
    shutil.rmtree(args.work / "out", ignore_errors=True)
    result = {
        "argv": sys.argv[1:],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": speed.machine(),
        "load_before": load_before,
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "repeats": args.repeats,
        "inputs": f"{args.experts} experts of {args.params / 1e6:.0f}M parameters (bf16), linear",
        "trees": described,
        "runs": runs,
        "summary": summary(runs),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown(result))
    args.results.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
