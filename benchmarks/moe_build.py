"""MoE-from-dense-experts benchmark: the zoo's 8 experts as one 8-expert Mixtral-style MoE.

Builds MoEs with `amalgam.moe.build_moe` (every expert's positive prompts: the first
`--prompts` prompts of its task's train split, no negative prompts) in several settings:
routers from hidden states (`gate_mode: hidden`) with 2 and with 1 expert per token, from
cheap embeddings, seeded random, and hidden over a TIES merge of the experts as the base (so
attention, norms and embeddings come from the merge instead of the pretrained base); and two
Qwen2-MoE builds whose shared expert is the base or the TIES merge (its gate from the first
2 prompts of every task). In the
same run it scores the base, each dense expert, and the dense merges task arithmetic, TIES and
averaging (authors' defaults, as benchmarks/quality.py), all on the test split with
`amalgam.evaluate.quick_evaluate`. It reports per-task accuracy, the routing table (per task,
the share of top-k slots each expert gets in each layer, over the task's test prompts),
parameter counts (the checkpoint's and transformers' after loading) and build times.
Writes `results/moe-build.{md,json}`.

`--memory` measures streaming instead: a synthetic float32 Llama base and 4 experts (random
tensors, `--hidden`/`--layers` sized) built into a Mixtral MoE with `gate_mode: random` in a
fresh process; it reports the process's peak RSS above its RSS after imports, against the
largest tensor and the output's size (`results/moe-build-memory.{md,json}`).

    python benchmarks/moe_build.py                  # full zoo (about 5 minutes, 2 cores)
    python benchmarks/moe_build.py --profile tiny   # tiny zoo
    python benchmarks/moe_build.py --memory         # streaming: peak RSS of a ~250 MB build
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "moe_build"
#: Dense merges scored alongside, with the defaults benchmarks/quality.py uses.
MERGES = {
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
    "linear": {},
}
#: MoE settings: label -> (gate_mode, experts_per_token, base, shared expert), the base and the
#: shared expert "base" or a merge's name; a shared expert makes the output Qwen2-MoE.
SETTINGS: dict[str, tuple[str, int, str, str | None]] = {
    "moe hidden k=2": ("hidden", 2, "base", None),
    "moe hidden k=1": ("hidden", 1, "base", None),
    "moe cheap_embed k=2": ("cheap_embed", 2, "base", None),
    "moe random k=2": ("random", 2, "base", None),
    "moe hidden k=2, TIES base": ("hidden", 2, "ties", None),
    "qwen2-moe hidden k=2, shared base": ("hidden", 2, "base", "base"),
    "qwen2-moe hidden k=2, TIES base, shared TIES": ("hidden", 2, "ties", "ties"),
}


def load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def score(folder: Path, zoo: Any, tasks: list[str], limit: int | None) -> dict[str, float]:
    from amalgam.evaluate.quick import quick_evaluate

    model, tokenizer = load(folder)
    return quick_evaluate(model, tokenizer, zoo.tasks_dir, tasks, split="test", limit=limit)


def merge(zoo: Any, tasks: list[str], method: str, params: dict, out: Path) -> float:
    from amalgam.engine import MergeOptions, run_merge
    from amalgam.recipe import ModelSpec, Recipe

    recipe = Recipe(
        method=method,
        base=str(zoo.base),
        models=[ModelSpec(uri=str(zoo.experts[t]), name=t) for t in tasks],
        params=params,
        dtype="float32",
    )
    options = MergeOptions(output=str(out), overwrite=True, device="cpu", threads=1)
    return run_merge(recipe, options).seconds


def routing(folder: Path, zoo: Any, tasks: list[str], limit: int | None) -> dict:
    """task -> layer -> share of the top-k slots routed to each expert, over the task's test
    prompts (each prompt run alone, so no pad token is routed)."""
    from amalgam.evaluate.taskdir import read_split
    from amalgam.zoo.routing import routing_shares

    model, tokenizer = load(folder)
    prompts = {
        t: [r["prompt"] for r in read_split(zoo.tasks_dir, t, "test")[:limit]] for t in tasks
    }
    return routing_shares(model, tokenizer, prompts)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from amalgam.checkpoint import open_checkpoint
    from amalgam.evaluate.taskdir import read_split
    from amalgam.moe import build_moe, parse_moe_config
    from amalgam.zoo import build_zoo, default_zoo_dir

    torch.set_num_threads(1)
    started = time.perf_counter()
    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=log)
    tasks = list(zoo.task_names)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scores: dict[str, dict[str, float]] = {"base": score(zoo.base, zoo, tasks, args.limit)}
    log("scoring experts")
    for task in tasks:
        scores[f"expert:{task}"] = score(zoo.experts[task], zoo, tasks, args.limit)
    merges: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for method, params in MERGES.items():
        log(f"merge {method}")
        merges[method] = work / method
        seconds[method] = merge(zoo, tasks, method, params, merges[method])
        scores[method] = score(merges[method], zoo, tasks, args.limit)
    prompts = {
        t: [r["prompt"] for r in read_split(zoo.tasks_dir, t, "train")[: args.prompts]]
        for t in tasks
    }
    moes: dict[str, dict[str, Any]] = {}
    everything = [p for t in tasks for p in prompts[t][:2]]
    for label, (gate_mode, per_token, base, shared) in SETTINGS.items():
        log(f"build {label}")
        out = work / label.replace(" ", "_").replace(",", "").replace("=", "")
        body: dict[str, Any] = {
            "base_model": str(zoo.base if base == "base" else merges[base]),
            "gate_mode": gate_mode,
            "experts_per_token": per_token,
            "experts": [
                {"source_model": str(zoo.experts[t]), "positive_prompts": prompts[t]} for t in tasks
            ],
        }
        if shared:
            source = zoo.base if shared == "base" else merges[shared]
            body["shared_experts"] = [{"source_model": str(source), "positive_prompts": everything}]
        config = parse_moe_config(body)
        t0 = time.perf_counter()
        result = build_moe(config, str(out))
        build_s = time.perf_counter() - t0
        model, _ = load(out)
        loaded = sum(p.numel() for p in model.parameters())
        scores[label] = score(out, zoo, tasks, args.limit)
        moes[label] = {
            "gate_mode": gate_mode,
            "experts_per_token": per_token,
            "base": base,
            "shared_expert": shared,
            "build_seconds": build_s,
            "params_checkpoint": result.num_params,
            "params_loaded": loaded,
            "routing": routing(out, zoo, tasks, args.limit),
        }
    with open_checkpoint(str(zoo.base)) as ckpt:
        dense_params = ckpt.num_params
    return {
        "zoo": zoo.root.name,
        "tasks": tasks,
        "limit": args.limit,
        "prompts_per_expert": args.prompts,
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        "1 thread",
        "scores": scores,
        "own": {t: scores[f"expert:{t}"][t] for t in tasks},
        "merge_seconds": seconds,
        "merges": {m: p for m, p in MERGES.items()},
        "moes": moes,
        "dense_params": dense_params,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "seconds": time.perf_counter() - started,
    }


#: The measured process: after imports, the peak-RSS mark is reset (Linux clear_refs 5) and the
#: RSS read; after the build, the peak since then (VmHWM), in bytes.
MEASURE = """
import json, sys
from amalgam.moe import build_moe, parse_moe_config

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
build_moe(parse_moe_config(json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps({"rss_after_imports": before, "peak_rss": status("VmHWM")}))
"""


def synthetic(folder: Path, seed: int, hidden: int, layers: int, vocab: int) -> Path:
    """A float32 Llama checkpoint of random tensors (no tokenizer: for gate_mode random)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    inter = 4 * hidden
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    shapes["model.norm.weight"] = (hidden,)
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    folder.mkdir(parents=True)
    save_file(
        {n: torch.randn(s, generator=g) for n, s in shapes.items()},
        str(folder / "model.safetensors"),
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def memory(args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """Peak RSS of a build in a fresh process, against the largest tensor and the output."""
    from amalgam.checkpoint import open_checkpoint

    work = Path(args.work) / "memory"
    shutil.rmtree(work, ignore_errors=True)
    sizes = (args.hidden, layers, 8192)
    base = synthetic(work / "base", 0, *sizes)
    experts = [synthetic(work / f"expert{i}", i + 1, *sizes) for i in range(4)]
    config = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts": [{"source_model": str(e)} for e in experts],
    }
    out = work / "moe"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(config), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    with open_checkpoint(str(out)) as moe, open_checkpoint(str(base)) as dense:
        largest = max(moe.info(n).nbytes for n in moe.names())
        result = {
            "hidden": args.hidden,
            "layers": layers,
            "experts": len(experts),
            "dense_bytes": dense.nbytes,
            "output_bytes": moe.nbytes,
            "largest_tensor_bytes": largest,
            "seconds": seconds,
            **measured,
        }
    shutil.rmtree(work, ignore_errors=True)
    return result


def memory_report(rows: list[dict[str, Any]]) -> str:
    mb = 1e6
    r = rows[0]
    lines = [
        "# MoE build: memory",
        "",
        f"Synthetic float32 Llamas (hidden {r['hidden']}, MLP {4 * r['hidden']}, vocabulary "
        f"8192) and {r['experts']} experts of their shapes built into a Mixtral MoE "
        "(`gate_mode: random`), each in a fresh process, by "
        "`python benchmarks/moe_build.py --memory`. `grown`: the peak RSS during the build "
        "above the RSS after imports.",
        "",
        "| layers | dense model | MoE written | largest tensor | RSS after imports | "
        "peak RSS since | grown | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        grown = r["peak_rss"] - r["rss_after_imports"]
        lines.append(
            f"| {r['layers']} | {r['dense_bytes'] / mb:.1f} MB | {r['output_bytes'] / mb:.1f} MB "
            f"| {r['largest_tensor_bytes'] / mb:.1f} MB | {r['rss_after_imports'] / mb:.1f} MB "
            f"| {r['peak_rss'] / mb:.1f} MB | {grown / mb:.1f} MB | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def short(task: str) -> str:
    return task.removeprefix("zoo_")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    scores, own = result["scores"], result["own"]
    head = "| model | " + " | ".join(short(t) for t in tasks) + " | avg | normalized |"
    rule = "|---|" + "---:|" * (len(tasks) + 2)

    def row(label: str, values: dict[str, float]) -> str:
        norm = mean(values[t] / own[t] if own[t] else 0.0 for t in tasks)
        cells = " | ".join(pct(values[t]) for t in tasks)
        return f"| {label} | {cells} | {pct(mean(values.values()))} | {pct(norm)} |"

    dense = ["base", *result["merges"]]
    best = max(result["merges"], key=lambda m: mean(scores[m].values()))
    lines = [
        "# An MoE built from the zoo's dense experts",
        "",
        f"Zoo `{result['zoo']}`, {len(tasks)} experts, test split"
        + (f" (first {result['limit']} per task)" if result["limit"] else "")
        + f"; routers from the first {result['prompts_per_expert']} train prompts of each "
        f"expert's task. {result['machine']}; whole run {result['seconds']:.0f} s, peak RSS "
        f"{result['peak_rss_gb']:.2f} GB (scoring included). Produced by "
        "`python benchmarks/moe_build.py`.",
        "",
        "## Accuracy (%) per task",
        "",
        "`normalized`: mean over tasks of accuracy / the task's own expert's accuracy.",
        "",
        head,
        rule,
        row("experts, each on its own task", own),
        *(row(m, scores[m]) for m in dense),
        *(row(label, scores[label]) for label in result["moes"]),
        "",
        f"Best dense merge in this run: `{best}` ({pct(mean(scores[best].values()))}% average).",
        "",
        "## Size",
        "",
        "| model | parameters (checkpoint) | parameters (transformers) | build s |",
        "|---|---:|---:|---:|",
        f"| dense base / expert | {result['dense_params']:,} | | |",
    ]
    for label, moe in result["moes"].items():
        lines.append(
            f"| {label} | {moe['params_checkpoint']:,} | {moe['params_loaded']:,} | "
            f"{moe['build_seconds']:.1f} |"
        )
    for label in ("moe hidden k=2", "moe cheap_embed k=2"):
        moe = result["moes"][label]
        lines += ["", f"## Routing: `{label}`", ""]
        lines.append(
            "Per task (rows), the share (%) of top-k slots of its test prompts' tokens that each "
            "expert (columns, named by its task) gets; **bold**: the task's own expert. With k "
            "experts per token a row sums to 100 and one expert gets at most 100/k: 50.0 at k=2 "
            "means the expert is among the two chosen for every token."
        )
        for layer in range(len(next(iter(moe["routing"].values())))):
            lines += ["", f"Layer {layer}:", ""]
            lines.append("| task | " + " | ".join(short(t) for t in tasks) + " |")
            lines.append("|---|" + "---:|" * len(tasks))
            for i, task in enumerate(tasks):
                shares = moe["routing"][task][layer]
                cells = [f"**{pct(s)}**" if j == i else pct(s) for j, s in enumerate(shares)]
                lines.append(f"| {short(task)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=["full", "tiny"])
    parser.add_argument("--limit", type=int, default=None, help="test examples per task")
    parser.add_argument("--prompts", type=int, default=8, help="router prompts per expert")
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--memory", action="store_true", help="measure streaming instead")
    parser.add_argument("--hidden", type=int, default=512, help="--memory: hidden size")
    parser.add_argument("--layers", default="4,8", help="--memory: layer counts, comma-separated")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.memory:
        measured = [memory(args, int(n)) for n in args.layers.split(",")]
        (RESULTS / "moe-build-memory.json").write_text(json.dumps(measured, indent=2) + "\n")
        (RESULTS / "moe-build-memory.md").write_text(memory_report(measured))
        print(memory_report(measured))
        return
    result = run(args)
    suffix = "" if args.profile == "full" else f"-{args.profile}"
    (RESULTS / f"moe-build{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"moe-build{suffix}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
