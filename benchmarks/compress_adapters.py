"""ComPEFT on the zoo's LoRA adapters: size, and accuracy of base + restored adapter.

For each zoo adapter and density, two ways to compress it, each restored and scored on the
adapter's own task (test split) with the quick scorer (`extract_lora.score`):

- factors: `amalgam compress` on the adapter folder (each LoRA factor's top-k as sign x scale,
  against zero), `amalgam decompress` back to an adapter, loaded with PEFT on the base;
- dense update: the adapter merged into the base by PEFT (`merge_and_unload`), compressed
  against the base at the same density (ComPEFT on scale * B @ A), decompressed to a model.

Sizes are the compressed weight bytes (shards with headers, and the manifest) against the
adapter's `adapter_model.safetensors`; the payload (positions, signs and scales alone, without
safetensors headers and manifest) is shown apart. Prints markdown tables.

    python benchmarks/compress_adapters.py --profile tiny
    python benchmarks/compress_adapters.py                      # full zoo
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "compress_adapters"
sys.path.insert(0, str(Path(__file__).parent))
from extract_lora import score  # noqa: E402


def merged_model(zoo, adapter: Path, out: Path) -> Path:
    """The base with ``adapter`` merged in by PEFT, saved as a model folder at ``out``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base), adapter)
    model.merge_and_unload().save_pretrained(out)
    return out


def round_trip(
    model: Path, base: Path | None, work: Path, density: float
) -> tuple[Path, tuple[int, int]]:
    """Compress ``model`` (against ``base`` when given) and decompress it; the restored folder
    and (compressed bytes, of which tensor payload: positions, signs, scales)."""
    from amalgam.compress import compress_model, decompress_model
    from amalgam.recipe import CompressSpec

    name, base_uri = f"{model.name}-d{density}", str(base) if base else None
    packed = str(work / f"{name}-packed")
    result = compress_model(str(model), base_uri, packed, CompressSpec(density=density))
    restored = decompress_model(packed, base_uri, str(work / f"{name}-restored"))
    payload = sum(t.stored_bytes for t in result.tensors)
    return Path(restored), (result.compressed_bytes, payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", help="zoo profile: full | tiny")
    parser.add_argument("--densities", default="0.1,0.3,0.5,1.0")
    parser.add_argument("--tasks", default=None, help="comma-separated (default: all adapters)")
    parser.add_argument("--limit", type=int, default=None, help="test examples per task")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]

    from amalgam.checkpoint import open_checkpoint
    from amalgam.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=lambda m: None)
    tasks = args.tasks.split(",") if args.tasks else sorted(zoo.loras)
    work = WORK / zoo.root.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows, sizes = [], {("original", None): []}  # (kind, density) -> [(bytes, payload)]
    for task in tasks:
        adapter = zoo.loras[task]
        weights = adapter / "adapter_model.safetensors"
        sizes["original", None].append((weights.stat().st_size, open_checkpoint(weights).nbytes))
        dense = merged_model(zoo, adapter, work / f"{task}-merged")
        row = [task, score(zoo.base, None, zoo, task, args.limit)]
        row.append(score(zoo.base, adapter, zoo, task, args.limit))
        for d in densities:
            restored, size = round_trip(adapter, None, work, d)
            row.append(score(zoo.base, restored, zoo, task, args.limit))
            sizes.setdefault(("factors", d), []).append(size)
        for d in densities:
            restored, size = round_trip(dense, zoo.base, work, d)
            row.append(score(restored, None, zoo, task, args.limit))
            sizes.setdefault(("dense update", d), []).append(size)
        rows.append(row)
        print(f"{task}: done", file=sys.stderr, flush=True)

    head = ["adapter", "base", "original"]
    head += [f"factors d{d}" for d in densities] + [f"dense update d{d}" for d in densities]
    print(f"zoo {zoo.root.name}, test split, limit {args.limit}, {args.threads} thread(s)\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print(f"| {row[0]} | " + " | ".join(f"{x:.3f}" for x in row[1:]) + " |")
    means = [mean(row[i] for row in rows) for i in range(1, len(head))]
    print("| **mean** | " + " | ".join(f"**{x:.3f}**" for x in means) + " |\n")
    original, tensors = (mean(v) for v in zip(*sizes["original", None], strict=True))
    print("| stored as | density | mean bytes | original / stored | payload bytes | ratio |")
    print("|---|---|---|---|---|---|")
    for (kind, d), values in sizes.items():
        total, payload = (mean(v) for v in zip(*values, strict=True))
        print(
            f"| {kind} | {d or '-'} | {total:,.0f} | {original / total:.2f} | {payload:,.0f} | "
            f"{tensors / payload:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
