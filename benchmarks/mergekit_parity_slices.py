"""Parity with mergekit 0.1.5 for slices/passthrough (frankenmerges, layer swaps, per-slice
slerp) and the methods nearswap, arcee_fusion, ram and ramplus_tl, in one run.

Each case is one mergekit YAML over the tiny zoo's float32 models, merged by mergekit-yaml (its
own venv, as benchmarks/speed.py runs it) and by amalgam (the same YAML through
amalgam.mergekit_compat), both computing and writing float32. Reported per case: the largest
absolute difference over every tensor, tensors only one side wrote, and both configs' layer
counts. Writes results/mergekit-parity-slices.{md,json}.

    python benchmarks/mergekit_parity_slices.py [--mergekit PATH/TO/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import speed  # noqa: E402  (a sibling script, not a package)

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MERGEKIT = Path("/work/scratch/mergekit-venv/bin/mergekit-yaml")


def cases(base: str, a: str, b: str, c: str) -> dict[str, dict[str, Any]]:
    """The mergekit configs compared (paths: the zoo's base and three experts, 2 layers each)."""

    def src(model: str, start: int, end: int) -> dict[str, Any]:
        return {"model": model, "layer_range": [start, end]}

    return {
        "passthrough frankenmerge (4 layers from 2)": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [src(a, 0, 2)]},
                {"sources": [src(b, 1, 2)]},
                {"sources": [src(a, 0, 1)]},
            ],
        },
        "passthrough layer swap (bottom from b)": {
            "merge_method": "passthrough",
            "slices": [{"sources": [src(b, 0, 1)]}, {"sources": [src(a, 1, 2)]}],
        },
        "slerp slices, filtered gradient (examples/gradient-slerp.yml)": {
            "merge_method": "slerp",
            "base_model": a,
            "slices": [{"sources": [src(a, 0, 2), src(b, 0, 2)]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        "slerp, gradient restarting in each of 3 slices": {
            "merge_method": "slerp",
            "base_model": a,
            "slices": [
                {"sources": [src(a, 0, 2), src(b, 0, 2)]},
                {"sources": [src(a, 1, 2), src(b, 0, 1)]},
                {"sources": [src(a, 0, 2), src(b, 0, 2)]},
            ],
            "parameters": {"t": [0.1, 0.9]},
        },
        "slerp of shifted ranges (base layer 1 with b layer 0)": {
            "merge_method": "slerp",
            "base_model": base,
            "slices": [{"sources": [src(base, 1, 2), src(b, 0, 1)]}],
            "parameters": {"t": 0.3},
        },
        "ties slice, sources' and slice's parameters": {
            "merge_method": "ties",
            "base_model": base,
            "slices": [
                {
                    "sources": [
                        {**src(a, 0, 2), "parameters": {"weight": 1.0, "density": 0.5}},
                        {**src(b, 0, 2), "parameters": {"weight": 0.5, "density": [0.3, 0.9]}},
                        src(base, 0, 2),
                    ],
                    "parameters": {"normalize": False},
                }
            ],
            "parameters": {"lambda": 0.8, "normalize": True},
        },
        "linear slices over three models": {
            "merge_method": "linear",
            "slices": [{"sources": [src(a, 0, 2), src(b, 0, 2), src(c, 0, 2)]}],
            "parameters": {"weight": 1.0},
        },
        "nearswap t=0.005": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": a}],
            "parameters": {"t": 0.005},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": a}],
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": m} for m in (a, b, c)],
            "parameters": {"epsilon": 1e-3},
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": m} for m in (a, b, c)],
            "parameters": {"epsilon": 1e-3, "r": 0.5, "alpha": 0.8},
        },
    }


def layers(folder: Path) -> int | None:
    path = folder / "config.json"
    return json.loads(path.read_text()).get("num_hidden_layers") if path.exists() else None


def run_case(name: str, cfg: dict[str, Any], exe: Path, work: Path) -> dict[str, Any]:
    from amalgam.engine import MergeOptions, run_merge
    from amalgam.recipe import parse_recipe

    slug = "".join(ch if ch.isalnum() else "-" for ch in name)[:40]
    cfg = {**cfg, "dtype": "float32", "out_dtype": "float32"}
    path = work / f"{slug}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    mk_out, am_out = work / f"{slug}-mergekit", work / f"{slug}-amalgam"
    mk = speed.run_mergekit(exe, path, mk_out, work / f"{slug}-mergekit.log")
    row: dict[str, Any] = {"config": cfg, "mergekit_wall_s": mk.wall_s}
    if mk.returncode != 0:
        row["mergekit_failed"] = mk.output[-600:]
        return row
    start = time.perf_counter()
    run_merge(
        parse_recipe(cfg, str(path)),
        MergeOptions(output=str(am_out), overwrite=True, device="cpu", threads=1),
    )
    row["amalgam_wall_s"] = time.perf_counter() - start
    row.update(speed.compare(am_out, mk_out))
    row["layers"] = {"amalgam": layers(am_out), "mergekit": layers(mk_out)}
    return row


def render(result: dict[str, Any]) -> str:
    lines = [
        "# mergekit parity: slices, passthrough, nearswap, arcee_fusion, ram",
        "",
        f"mergekit {result['mergekit_version']} (`mergekit-yaml`, own venv) against amalgam on "
        f"the same YAML; tiny zoo `{result['zoo']}` (float32, 2 layers, hidden 64), both "
        "computing and writing float32. Command: `python benchmarks/mergekit_parity_slices.py`.",
        "",
        "| case | max abs diff | tensors compared | only in one | layers (amalgam / mergekit) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        if "mergekit_failed" in row:
            lines.append(f"| {name} | mergekit failed | | | |")
            continue
        only = len(row["only_in_amalgam"]) + len(row["only_in_mergekit"])
        lay = row["layers"]
        lines.append(
            f"| {name} | {row['max_abs_diff']:.2e} | {row['elements']} elements | {only} | "
            f"{lay['amalgam']} / {lay['mergekit']} |"
        )
    lines += [
        "",
        "Differences are float32 rounding of differently ordered arithmetic (0 for copies). "
        "arcee_fusion keeps the same entries because no zoo tensor has more than 10^6 "
        "entries (mergekit then samples its quantiles at random; amalgam always takes exact "
        "ones).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="mergekit-yaml")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from amalgam.mergekit_compat import MERGEKIT_VERSION
    from amalgam.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir(), profile="tiny", log=lambda m: None)
    experts = [str(zoo.experts[t]) for t in ("zoo_sort", "zoo_count", "zoo_caesar")]
    result: dict[str, Any] = {
        "mergekit_version": MERGEKIT_VERSION,
        "zoo": zoo.root.name,
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cases(str(zoo.base), *experts).items():
            print(name, file=sys.stderr, flush=True)
            result["cases"][name] = run_case(name, cfg, args.mergekit, Path(tmp))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mergekit-parity-slices.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results / "mergekit-parity-slices.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
