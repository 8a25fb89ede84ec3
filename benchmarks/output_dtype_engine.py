"""Whole engine merges of a bf16 model, this tree against a baseline tree (a ``git worktree``
of an earlier commit, e.g. before the kernels stored the output dtype), for linear and
task_arithmetic.

The model: 2 x 4096x4096 + 32000x1024 bf16 tensors, base + 3 (written once under ``--work``).
Each run is a fresh process on one tree that merges once to warm numba's cache and the page
cache, then times a second ``run_merge`` (process CPU seconds over all threads, and wall);
trees interleaved, median of ``--repeats``; the two outputs are compared byte for byte.
Writes benchmarks/results/output-dtype-engine.md.

    git worktree add --detach /tmp/main-9aa7a2c 9aa7a2c
    python benchmarks/output_dtype_engine.py --baseline /tmp/main-9aa7a2c   # about 2 minutes
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # a sibling script, not a package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "output-dtype-engine.md"
SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (4096, 4096),
    "model.layers.0.mlp.down_proj.weight": (4096, 4096),
    "model.embed_tokens.weight": (32000, 1024),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
MERGE = """
import sys, time
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
method, work, out = sys.argv[1:4]
models = [{'uri': f'{work}/m{i}', 'params': {'weight': 0.3 + 0.2 * i}} for i in (1, 2, 3)]
data = {'method': method, 'models': models, 'output': out + '-warm', 'seed': 1}
if method != 'linear':
    data['base'] = f'{work}/m0'
run_merge(parse_recipe(data), MergeOptions(device='cpu'))
recipe = parse_recipe({**data, 'output': out})
c, w = time.process_time(), time.perf_counter()
run_merge(recipe, MergeOptions(device='cpu'))
print(time.process_time() - c, time.perf_counter() - w)
"""


def write_models(work: Path) -> None:
    """A base and three experts (base + 1% noise) in bf16, unless already there."""
    if (work / "m3" / "config.json").exists():
        return
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    for i in range(4):
        noise = 0.0 if i == 0 else 0.01
        t = {
            k: (v + noise * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
            for k, v in base.items()
        }
        folder = work / f"m{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(CONFIG))


def merge(tree: Path, method: str, work: Path, out: Path) -> tuple[float, float]:
    """(CPU s, wall s) of one timed merge by ``tree``'s code, in a fresh process."""
    for folder in (out, Path(f"{out}-warm")):
        shutil.rmtree(folder, ignore_errors=True)
    env = os.environ | {"PYTHONPATH": str(tree), "AMALGAM_HOME": str(work / "home")}
    run = subprocess.run(
        [sys.executable, "-c", MERGE, method, str(work), str(out)],
        env=env, capture_output=True, text=True, check=True, cwd=tree,
    )  # fmt: skip
    cpu, wall = run.stdout.split()[-2:]
    return float(cpu), float(wall)


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=tree).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the baseline source tree")
    ap.add_argument("--work", type=Path, default=Path("/tmp/amalgam-output-dtype"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": ROOT}
    write_models(args.work)
    rows = []
    for method in ("linear", "task_arithmetic"):
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                times[name].append(merge(tree, method, args.work, args.work / f"out-{name}"))
        cpu = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
        wall = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
        same = filecmp.cmp(
            args.work / "out-baseline" / "model.safetensors",
            args.work / "out-this tree" / "model.safetensors",
            shallow=False,
        )
        a, b = cpu["baseline"], cpu["this tree"]
        rows.append(
            f"| {method} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {wall['baseline']:.2f} "
            f"| {wall['this tree']:.2f} | {'yes' if same else 'NO'} |"
        )
        print(rows[-1], flush=True)
    RESULTS.write_text(
        "# Whole engine merges: kernels storing the output dtype\n\n"
        f"`python benchmarks/output_dtype_engine.py --baseline <worktree of "
        f"{git(args.baseline, 'rev-parse', '--short', 'HEAD')}> --repeats {args.repeats}` at "
        f"{speed.source_state()['commit']}, {speed.cpu_model()}, {os.cpu_count()} cores "
        "(shared with other jobs), torch "
        f"{torch.__version__}. bf16 model 2 x 4096x4096 + 32000x1024, base + 3, weights "
        "0.3/0.5/0.7 (seed 1), `run_merge` on CPU with the engine's default threads; each run a "
        "fresh process, warmed by one merge, then one timed merge; medians of interleaved "
        "runs. CPU s: process CPU time over all threads (reads, merge, writes).\n\n"
        "| method | baseline CPU s | this tree CPU s | CPU ratio | baseline wall s "
        "| this tree wall s | same bytes |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


if __name__ == "__main__":
    main()
