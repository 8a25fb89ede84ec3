"""LoRA extraction on the zoo: accuracy of base + extracted adapter against the full expert.

For each chosen expert, `amalgam.adapters.extract_lora` extracts an adapter at each rank
(modules_to_save on), and once at the middle rank with the changed non-target tensors
dropped; each adapter is loaded with PEFT on the base and scored on the expert's own task
(test split) with `amalgam.evaluate.quick_evaluate`, next to the base, the full expert and
the zoo's own trained LoRA. Prints a markdown table (and the mean retained energy per rank).

    python benchmarks/extract_lora.py                       # full zoo, 3 experts, r 8/16/32
    python benchmarks/extract_lora.py --profile tiny --limit 64
    python benchmarks/extract_lora.py --synthetic 1e8 --ranks 16   # time and peak RSS only
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "extract_lora"


def score(folder: Path, adapter: Path | None, zoo, task: str, limit: int | None) -> float:
    """Accuracy on `task` of the model folder, with `adapter` loaded on it by PEFT if given."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.evaluate.quick import quick_evaluate

    model = AutoModelForCausalLM.from_pretrained(folder)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    return quick_evaluate(model.eval(), tokenizer, zoo.tasks_dir, [task], limit=limit)[task]


def synthetic(params: float, rank: int, threads: int) -> None:
    """Wall time and peak RSS of one extraction (rank ``rank``, CPU) from the speed benchmark's
    synthetic bf16 Llama of about ``params`` parameters and its first expert, in a fresh
    process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import build_family, llama_shape

    shape = llama_shape(params)
    paths = build_family(shape, 1, ROOT / "benchmarks" / ".work")
    out = WORK / f"synthetic-{shape.params / 1e6:.0f}M-r{rank}"
    shutil.rmtree(out, ignore_errors=True)
    child = f"""
import json, resource, time
from amalgam.adapters.extract import extract_lora
start = time.perf_counter()
r = extract_lora({str(paths["base"])!r}, {str(paths["expert1"])!r}, {str(out)!r}, rank={rank},
                 device="cpu", threads={threads})
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": seconds, "rss": rss, "modules": len(r.modules)}}))
"""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    found = json.loads(done.stdout.strip().splitlines()[-1])
    model_bytes = sum(f.stat().st_size for f in paths["expert1"].glob("*.safetensors"))
    largest = max(math.prod(dims) for _, dims in shape.tensors()) * 4
    print(
        f"synthetic Llama {shape.params / 1e6:.0f}M parameters (bf16, {model_bytes / 1e6:.0f} MB"
        f" per model), rank {rank}, {threads} thread(s): {found['modules']} modules in "
        f"{found['seconds']:.1f} s ({wall:.1f} s with start-up), peak RSS "
        f"{found['rss'] / 1e6:.0f} MB; largest tensor in float32 {largest / 1e6:.0f} MB; adapter "
        f"{(out / 'adapter_model.safetensors').stat().st_size / 1e6:.0f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", help="zoo profile: full | tiny")
    parser.add_argument("--experts", default="zoo_caesar,zoo_sort,zoo_count")
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--limit", type=int, default=None, help="test examples per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--synthetic",
        type=float,
        default=None,
        metavar="PARAMS",
        help="instead: time and peak RSS of extracting at the first rank from a synthetic Llama",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.synthetic:
        synthetic(args.synthetic, ranks[0], args.threads)
        return 0

    from amalgam.adapters.extract import extract_lora
    from amalgam.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=lambda m: None)
    middle = ranks[len(ranks) // 2]
    work = WORK / zoo.root.name
    shutil.rmtree(work, ignore_errors=True)
    first = zoo.loras[args.experts.split(",")[0]] / "adapter_config.json"
    trained = json.loads(first.read_text())["r"]
    head = ["expert", "base", "full expert", f"zoo LoRA (trained, r{trained})"]
    head += [f"extracted r{r}" for r in ranks] + [f"r{middle}, modules dropped"]
    rows, energies, seconds = [], {r: [] for r in ranks}, []
    for task in args.experts.split(","):
        expert = zoo.experts[task]
        row = [
            task,
            score(zoo.base, None, zoo, task, args.limit),
            score(expert, None, zoo, task, args.limit),
            score(zoo.base, zoo.loras[task], zoo, task, args.limit),
        ]
        runs = [(r, True) for r in ranks] + [(middle, False)]
        for rank, keep in runs:
            out = work / f"{task}-r{rank}{'' if keep else '-dropped'}"
            start = time.perf_counter()
            result = extract_lora(
                str(zoo.base),
                str(expert),
                str(out),
                rank=rank,
                save_modules=keep,
                device="cpu",
                threads=args.threads,
            )
            if keep:
                seconds.append(time.perf_counter() - start)
                energies[rank].append(mean(m.energy for m in result.modules))
            row.append(score(zoo.base, out, zoo, task, args.limit))
        rows.append(row)
        print(f"{task}: done", file=sys.stderr, flush=True)
    print(f"zoo {zoo.root.name}, test split, limit {args.limit}, {args.threads} thread(s)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{x:.3f}" for x in row[1:]) + " |")
    gaps = [mean(row[i] - row[2] for row in rows) for i in range(3, len(head))]
    print(
        "\nmean accuracy minus the full expert's: "
        + ", ".join(f"{name} {gap:+.3f}" for name, gap in zip(head[3:], gaps, strict=True))
    )
    print("mean retained energy: " + ", ".join(f"r{r} {mean(energies[r]):.3f}" for r in ranks))
    print(f"extraction: {mean(seconds):.2f} s per adapter on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
