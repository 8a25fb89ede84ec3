"""Peak memory of one merge against ``--memory-budget``: each run in a fresh process.

Reads the mergekit YAMLs ``benchmarks/speed.py`` leaves under ``WORK/runs`` (build them first
with ``python benchmarks/speed.py --skip-mergekit [--quick] [--experts N] --work WORK``), runs
each method once per budget and prints, per run: RSS after imports, peak RSS (VmHWM), its
growth over the imports, in-engine wall and CPU seconds. ``--budget none`` runs without the
option (a tree older than it: the baseline).

    python benchmarks/memory_budget.py WORK --methods ties,task_arithmetic --budgets 1GiB,512MiB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time, resource
start = time.perf_counter()
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import load_recipe
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
recipe = load_recipe(sys.argv[1])
imported = status("VmRSS")
extra = {} if sys.argv[3] == "none" else {"memory_budget": int(sys.argv[3])}
options = MergeOptions(output=sys.argv[2], overwrite=True, device="cpu", **extra)
cpu = time.process_time()
result = run_merge(recipe, options)
print(json.dumps({"imports_gb": imported / 1e9, "peak_gb": status("VmHWM") / 1e9,
                  "growth_gb": (status("VmHWM") - imported) / 1e9, "merge_s": result.seconds,
                  "cpu_s": time.process_time() - cpu}))
"""
UNITS = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "MB": 10**6, "GB": 10**9}


def size(text: str) -> str:
    """``512MiB`` -> bytes, as text; ``none`` stays."""
    if text == "none":
        return text
    digits = text.rstrip("KMGiBb")
    return str(int(float(digits) * UNITS[text[len(digits) :].upper()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="a speed.py --work folder")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties")
    ap.add_argument("--budgets", default="1GiB", help="comma-separated; none: no option")
    args = ap.parse_args()
    out = args.work / "memory-budget-out"
    print("| method | budget | imports RSS GB | peak RSS GB | growth GB | in-engine s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for budget in args.budgets.split(","):
            cfg = args.work / "runs" / f"{method}.yml"
            cmd = [sys.executable, "-c", CHILD, str(cfg), str(out), size(budget)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{method} {budget} failed:\n{done.stderr[-2000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {method} | {budget} | {r['imports_gb']:.2f} | {r['peak_gb']:.2f} | "
                f"{r['growth_gb']:.2f} | {r['merge_s']:.2f} | {r['cpu_s']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
