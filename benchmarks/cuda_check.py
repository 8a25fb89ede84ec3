"""CUDA check: every method merged on CPU and on CUDA, outputs compared, times reported.

Run on a machine with a GPU: ``python benchmarks/cuda_check.py [--layers 8] [--hidden 1024]``.
DARE masks are drawn on the CPU, so random methods agree across devices too; the remaining
differences are float32 rounding of reductions and fused kernels, well below bf16's ulp.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.merge import REGISTRY
from amalgam.recipe import parse_recipe


def synthetic_family(root: Path, layers: int, hidden: int, experts: int = 3) -> list[Path]:
    """A bf16 Llama-shaped base and experts = base + small deltas."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (8 * hidden, hidden),
        "lm_head.weight": (8 * hidden, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "mlp.up_proj.weight": (3 * hidden, hidden),
            p + "input_layernorm.weight": (hidden,),
        }
    base = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
    paths = []
    for j in range(experts + 1):
        t = (
            base
            if j == 0
            else {
                k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).bfloat16()
                for k, v in base.items()
            }
        )
        folder = root / ("base" if j == 0 else f"e{j}")
        folder.mkdir(parents=True)
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
        paths.append(folder)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    args = ap.parse_args()
    print(
        f"cuda available: {torch.cuda.is_available()}",
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    )
    root = Path(tempfile.mkdtemp())
    base, *experts = synthetic_family(root, args.layers, args.hidden)
    rows = []
    variants = [(m, m, {}) for m in sorted(REGISTRY)] + [
        ("ties trim=model", "ties", {"trim": "model"})
    ]
    for label, method, params in variants:
        models = experts[:1] if method == "slerp" else experts
        data = {"method": method, "params": params, "models": [{"uri": str(e)} for e in models]}
        if method != "linear":
            data["base"] = str(base)
        outs, secs = {}, {}
        for device in ("cpu", "cuda"):
            out = root / f"{label.replace(' ', '_')}-{device}"
            start = time.perf_counter()
            run_merge(parse_recipe({**data, "output": str(out)}), MergeOptions(device=device))
            secs[device] = time.perf_counter() - start
            outs[device] = load_file(str(out / "model.safetensors"))
        diff = max(
            (outs["cpu"][k].float() - outs["cuda"][k].float()).abs().max().item()
            for k in outs["cpu"]
        )
        same = sum(torch.equal(outs["cpu"][k], outs["cuda"][k]) for k in outs["cpu"])
        rows.append((label, secs["cpu"], secs["cuda"], diff, same, len(outs["cpu"])))
    print("| method | cpu s | cuda s | max abs diff | identical tensors |")
    print("|---|---|---|---|---|")
    for m, c, g, d, s, n in rows:
        print(f"| {m} | {c:.2f} | {g:.2f} | {d:.2e} | {s}/{n} |")


if __name__ == "__main__":
    main()
