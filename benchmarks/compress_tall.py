"""TALL-mask storage of the zoo's experts: bytes, and each rebuilt expert's accuracy.

The zoo's experts are stored once with `compress_tall` (base + one multi-task vector + one
bit mask per task) for each mask threshold lambda of the paper's grid; every expert is then
rebuilt with `decompress_model(..., task=...)` and scored on its own task with the quick
scorer (validation and test splits). "chosen" takes, per task, the lambda with the best
validation accuracy (ties: the smaller lambda) and reports its test accuracy: the paper's
per-task selection. Bytes are the files on disk: the TALL folder's weight files (shards with
headers, and the manifest) and the base's weights, against the experts' weight files.

    python benchmarks/compress_tall.py --profile tiny
    python benchmarks/compress_tall.py --memory        # peak RSS against the largest tensor

`--memory` writes a synthetic float32 base whose largest tensor is 64 MiB and 4 experts, and
measures the peak RSS (VmHWM) of `compress_tall` and of one `decompress_model(..., task=...)`,
each in a fresh process, above the process's RSS (VmRSS) once torch and amalgam are imported
(the import's own transient peak can hide a smaller growth: then the figure is a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "compress_tall"
RESULTS = ROOT / "benchmarks" / "results"
GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
NO_MASK = 0.0  # every entry a task changed takes tau_MTL: the task-arithmetic sum, lambda 1
SPLITS = ("validation", "test")


def score(folder: Path, zoo, task: str, split: str) -> float:
    """Accuracy of the model folder on ``task``'s ``split`` (quick scorer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.evaluate.quick import quick_evaluate

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    return quick_evaluate(model, tokenizer, zoo.tasks_dir, [task], split=split)[task]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(profile: str) -> dict:
    from amalgam.compress import decompress_model
    from amalgam.compress.tall import compress_tall
    from amalgam.recipe import CompressSpec
    from amalgam.zoo import build_zoo

    zoo = build_zoo(profile=profile, log=lambda _: None)
    tasks = list(zoo.task_names)
    experts = {t: str(zoo.experts[t]) for t in tasks}
    shutil.rmtree(WORK, ignore_errors=True)
    original = {t: {s: score(zoo.experts[t], zoo, t, s) for s in SPLITS} for t in tasks}
    base = {t: score(zoo.base, zoo, t, "test") for t in tasks}
    rebuilt: dict[float, dict[str, dict[str, float]]] = {}
    stored: dict[float, dict] = {}
    for lam in (*GRID, NO_MASK):
        packed = WORK / f"tall-{lam}"
        result = compress_tall(
            experts, str(zoo.base), str(packed), CompressSpec(method="tall", tall_lambda=lam)
        )
        stored[lam] = {
            "tall_bytes": result.compressed_bytes,
            "mask_share": sum(t.kept for t in result.tensors)
            / sum(t.numel for t in result.tensors),
        }
        rebuilt[lam] = {}
        for t in tasks:
            out = Path(decompress_model(str(packed), None, str(WORK / f"{t}-{lam}"), task=t))
            rebuilt[lam][t] = {s: score(out, zoo, t, s) for s in SPLITS}
            shutil.rmtree(out)
    chosen = {
        t: min(GRID, key=lambda lam, t=t: (-rebuilt[lam][t]["validation"], lam)) for t in tasks
    }
    experts_bytes = sum(weight_bytes(zoo.experts[t]) for t in tasks)
    return {
        "profile": profile,
        "tasks": tasks,
        "base_bytes": weight_bytes(zoo.base),
        "base": base,
        "experts_bytes": experts_bytes,
        "original": original,
        "rebuilt": {str(k): v for k, v in rebuilt.items()},
        "stored": {str(k): v for k, v in stored.items()},
        "chosen": chosen,
    }


def markdown(r: dict) -> str:
    tasks, grid = r["tasks"], [str(g) for g in GRID]
    orig = {t: r["original"][t]["test"] for t in tasks}
    base = r["base"]
    none = str(NO_MASK)
    lines = [
        f"# TALL-mask storage of the zoo's {len(tasks)} experts (profile `{r['profile']}`)",
        "",
        "Made by `python benchmarks/compress_tall.py --profile "
        f"{r['profile']}`. Test-split accuracy (%) of each expert on its own task, quick "
        "scorer; rebuilt = base + m_t * tau_MTL from the TALL folder (tau_MTL: the sum of the "
        "task vectors), for each lambda of the paper's grid. `chosen`: per task, the lambda "
        "with the best validation accuracy. `no mask`: lambda 0, every entry the task changed "
        "takes tau_MTL (the plain task-arithmetic sum, one model for all tasks).",
        "",
        "| task | base | expert | "
        + " | ".join(f"lambda {g}" for g in grid)
        + " | chosen (lambda) | no mask |",
        "|---|---:|---:|" + "---:|" * len(grid) + "---:|---:|",
    ]
    for t in tasks:
        cells = [f"{100 * r['rebuilt'][g][t]['test']:.1f}" for g in grid]
        c = r["chosen"][t]
        lines.append(
            f"| {t} | {100 * base[t]:.1f} | {100 * orig[t]:.1f} | "
            + " | ".join(cells)
            + f" | {100 * r['rebuilt'][str(c)][t]['test']:.1f} ({c}) | "
            f"{100 * r['rebuilt'][none][t]['test']:.1f} |"
        )

    def retained(acc: dict[str, float]) -> str:
        return f"{100 * sum(acc.values()) / sum(orig.values()):.1f}%"

    def gain(acc: dict[str, float]) -> str:
        """The share of the experts' gain over the base kept, summed over tasks."""
        kept = sum(acc[t] - base[t] for t in tasks)
        return f"{100 * kept / sum(orig[t] - base[t] for t in tasks):.1f}%"

    per_lambda = {g: {t: r["rebuilt"][g][t]["test"] for t in tasks} for g in [*grid, none]}
    chosen = {t: r["rebuilt"][str(r["chosen"][t])][t]["test"] for t in tasks}
    columns = [per_lambda[g] for g in grid] + [chosen, per_lambda[none]]
    lines.append(
        f"| **average** | {100 * mean(base.values()):.1f} | {100 * mean(orig.values()):.1f} | "
        + " | ".join(f"{100 * mean(c.values()):.1f}" for c in columns)
        + " |"
    )
    lines.append(
        f"| accuracy retained (sum) | {retained(base)} | 100% | "
        + " | ".join(retained(c) for c in columns)
        + " |"
    )
    lines.append(
        "| gain over the base retained (sum) | 0% | 100% | "
        + " | ".join(gain(c) for c in columns)
        + " |"
    )
    base, experts = r["base_bytes"], r["experts_bytes"]
    lines += [
        "",
        "## Bytes",
        "",
        f"{len(tasks)} experts' weight files: {experts:,} bytes; the base's: {base:,} bytes.",
        "",
        "| lambda | TALL folder (vector, masks, headers, manifest) | base + TALL | "
        "vs the experts | mask entries set |",
        "|---:|---:|---:|---:|---:|",
    ]
    for g in grid:
        s = r["stored"][g]
        total = base + s["tall_bytes"]
        lines.append(
            f"| {g} | {s['tall_bytes']:,} | {total:,} | {experts / total:.2f}x smaller | "
            f"{100 * s['mask_share']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


MEMORY_CHILD = """
import json, sys
from amalgam.compress import decompress_model
from amalgam.compress.tall import compress_tall
from amalgam.recipe import CompressSpec
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = status("VmRSS")
work, step = sys.argv[1], sys.argv[2]
if step == "compress":
    experts = {f"e{i}": f"{work}/e{i}" for i in range(4)}
    compress_tall(experts, f"{work}/base", f"{work}/tall", CompressSpec(method="tall"))
else:
    decompress_model(f"{work}/tall", None, f"{work}/rebuilt", task="e0")
after = status("VmHWM")
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


def memory() -> dict:
    """Peak RSS growth of TALL compression and decompression, in MiB, against the largest
    tensor's size."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    work = WORK / "memory"
    shutil.rmtree(work, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (16384, 1024), "model.norm.weight": (1024,)}
    shapes |= {f"model.layers.{i}.mlp.up_proj.weight": (1024, 1024) for i in range(4)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for name, tensors in [("base", base)] + [
        (f"e{i}", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        for i in range(4)
    ]:
        (work / name).mkdir(parents=True)
        save_file(tensors, str(work / name / "model.safetensors"))
        (work / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    largest = max(t.numel() * 4 for t in base.values()) / 2**20
    out = {"largest_tensor_mib": largest, "experts": 4}
    for step in ("compress", "decompress"):
        run = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(work), step],
            capture_output=True,
            text=True,
            check=True,
        )
        kib = json.loads(run.stdout.strip().splitlines()[-1])
        out[f"{step}_peak_growth_mib"] = (kib["after_kib"] - kib["before_kib"]) / 1024
    shutil.rmtree(work)
    return out


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' weight-loading bars
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--memory", action="store_true", help="peak RSS on a synthetic model")
    args = parser.parse_args()
    if args.memory:
        found = memory()
        (RESULTS / "compress-tall-memory.json").write_text(json.dumps(found, indent=2) + "\n")
        print(json.dumps(found, indent=2))
        return
    r = run(args.profile)
    suffix = "" if args.profile == "tiny" else f"-{args.profile}"
    (RESULTS / f"compress-tall{suffix}.json").write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(r)
    (RESULTS / f"compress-tall{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
