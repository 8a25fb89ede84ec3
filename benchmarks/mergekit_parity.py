"""mergekit parity: the same mergekit YAML merged by mergekit 0.1.5 and by amalgam, compared.

For each case (della, della_linear, sce, nuslerp, multislerp, karcher, with the parameter
settings that matter), one mergekit YAML over the zoo's base and three of its full fine-tunes
is merged by ``mergekit-yaml`` (its own venv) and by amalgam (``amalgam.mergekit_compat``, then
``run_merge``), both computing in float32. Deterministic cases report the largest absolute
difference over every tensor and how many tensors are bit-identical. DELLA with density < 1
draws random masks (mergekit: the global torch generator under ``--random-seed``; amalgam: its
seeded per-tensor streams), so those rows compare the distribution instead: the fraction of
task-vector entries kept and the mean |output - base| of each tool.

    python benchmarks/mergekit_parity.py                  # tiny zoo, every case (~4 minutes)
    python benchmarks/mergekit_parity.py --cases sce,karcher
    python benchmarks/mergekit_parity.py --mergekit /path/to/venv/bin/mergekit-yaml

Results: ``benchmarks/results/mergekit-parity.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from speed import (
    MERGEKIT_VERSION,
    RESULTS,
    WORK,
    ensure_mergekit,
    machine,
    run_mergekit,
    source_state,
)

EXPERTS = ("zoo_sort", "zoo_count", "zoo_caesar")
Cfg = Callable[[str, list[str]], dict[str, Any]]


def models(experts: list[str], **params: Any) -> list[dict[str, Any]]:
    return [{"model": e, "parameters": dict(params)} if params else {"model": e} for e in experts]


def weighted(experts: list[str], weights: list[float], **params: Any) -> list[dict[str, Any]]:
    return [
        {"model": e, "parameters": {"weight": w, **params}}
        for e, w in zip(experts, weights, strict=False)
    ]


#: label -> (deterministic, mergekit config from (base, experts))
CASES: dict[str, tuple[bool, Cfg]] = {
    "sce": (True, lambda b, e: {"merge_method": "sce", "base_model": b, "models": models(e)}),
    "sce select_topk 0.3": (
        True,
        lambda b, e: {
            "merge_method": "sce",
            "base_model": b,
            "models": models(e),
            "parameters": {"select_topk": 0.3},
        },
    ),
    "della density 1": (
        True,
        lambda b, e: {
            "merge_method": "della",
            "base_model": b,
            "models": weighted(e, [1.0, 0.6, 0.8]),
        },
    ),
    "della_linear density 1": (
        True,
        lambda b, e: {
            "merge_method": "della_linear",
            "base_model": b,
            "models": weighted(e, [0.5, 0.3, 0.4]),
        },
    ),
    "della density 0.5": (
        False,
        lambda b, e: {
            "merge_method": "della",
            "base_model": b,
            "models": weighted(e, [1.0, 1.0, 1.0], density=0.5, epsilon=0.15),
        },
    ),
    "della_linear density 0.5": (
        False,
        lambda b, e: {
            "merge_method": "della_linear",
            "base_model": b,
            "models": weighted(e, [0.5, 0.5, 0.5], density=0.5, epsilon=0.15),
        },
    ),
    "nuslerp over base": (
        True,
        lambda b, e: {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": weighted(e[:2], [0.4, 0.6]),
        },
    ),
    "nuslerp rows": (
        True,
        lambda b, e: {
            "merge_method": "nuslerp",
            "models": weighted(e[:2], [0.7, 0.3]),
            "parameters": {"nuslerp_flatten": False},
        },
    ),
    "nuslerp columns": (
        True,
        lambda b, e: {
            "merge_method": "nuslerp",
            "models": weighted(e[:2], [0.5, 0.5]),
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
    ),
    "multislerp over base": (
        True,
        lambda b, e: {
            "merge_method": "multislerp",
            "base_model": b,
            "models": weighted(e, [0.2, 0.5, 0.3]),
        },
    ),
    "multislerp": (
        True,
        lambda b, e: {"merge_method": "multislerp", "models": weighted(e, [1.0, 1.0, 2.0])},
    ),
    "karcher": (True, lambda b, e: {"merge_method": "karcher", "models": models(e)}),
    "karcher with base_model": (
        True,
        lambda b, e: {
            "merge_method": "karcher",
            "base_model": b,
            "models": models(e),
            "parameters": {"max_iter": 20, "tol": 1e-6},
        },
    ),
}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def compare(amalgam: Path, mergekit: Path) -> dict[str, Any]:
    """Largest |difference| over every shared tensor and how many tensors are bit-identical."""
    a, m = weights(amalgam), weights(mergekit)
    shared = sorted(set(a) & set(m))
    diffs = {n: float((a[n].double() - m[n].double()).abs().max()) for n in shared}
    worst = max(diffs, key=diffs.__getitem__)
    return {
        "tensors": len(shared),
        "only_in_amalgam": sorted(set(a) - set(m)),
        "only_in_mergekit": sorted(set(m) - set(a)),
        "identical": sum(torch.equal(a[n], m[n]) for n in shared),
        "max_abs_diff": diffs[worst],
        "worst_tensor": worst,
        "max_abs_value": max(float(m[n].abs().max()) for n in shared),
    }


def spread(out: Path, base: Path, experts: list[Path]) -> dict[str, float]:
    """Fraction of entries that differ from the base where some expert does, and the mean
    |output - base| (the drop's visible statistics)."""
    o, b = weights(out), weights(base)
    xs = [weights(e) for e in experts]
    moved = changed = 0
    total = 0.0
    count = 0
    for n, t in b.items():
        any_delta = torch.stack([x[n] != t for x in xs]).any(0)
        changed += int(any_delta.sum())
        moved += int(((o[n] != t) & any_delta).sum())
        total += float((o[n].double() - t.double()).abs().sum())
        count += t.numel()
    return {"frac_moved": moved / max(changed, 1), "mean_abs_delta": total / count}


def run_amalgam(source: Path, out: Path) -> float:
    from amalgam.engine import MergeOptions, run_merge
    from amalgam.recipe import load_recipe

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_merge(load_recipe(str(source)), MergeOptions(output=str(out), device="cpu"))
    return time.perf_counter() - start


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# mergekit parity",
        "",
        f"Each case's mergekit YAML merged by mergekit {result['mergekit_version']} and by "
        f"amalgam (commit {result['source']['commit']}) on zoo `{result['zoo']}` (base + "
        f"{', '.join(EXPERTS)}), both in float32. {result['machine']}. "
        "Written by `benchmarks/mergekit_parity.py`.",
        "",
        "| case | compared | tensors identical | max abs diff | largest |value| | "
        "amalgam s | mergekit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in result["cases"].items():
        if row["deterministic"]:
            c = row["compare"]
            compared = "elementwise"
            ident = f"{c['identical']}/{c['tensors']}"
            diff, big = f"{c['max_abs_diff']:.2e}", f"{c['max_abs_value']:.2f}"
        else:
            a, m = row["amalgam_spread"], row["mergekit_spread"]
            compared = (
                f"random: kept {a['frac_moved']:.3f} vs {m['frac_moved']:.3f}; "
                f"mean abs delta {a['mean_abs_delta']:.2e} vs {m['mean_abs_delta']:.2e}"
            )
            ident, diff, big = "-", "-", "-"
        lines.append(
            f"| {label} | {compared} | {ident} | {diff} | {big} | {row['amalgam_s']:.2f} "
            f"| {row['mergekit_s']:.1f} |"
        )
    lines += [
        "",
        "mergekit s includes its start-up (about 10 s of imports per run); amalgam s is the "
        "in-process merge. Random rows: kept = fraction of task-vector entries that moved the "
        "output off the base, amalgam vs mergekit.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case labels (default: all)")
    ap.add_argument("--mergekit", type=Path, help="mergekit-yaml (default: a venv under --work)")
    ap.add_argument("--work", type=Path, default=WORK / "mergekit-parity")
    ap.add_argument("--profile", default="tiny", help="zoo profile (tiny or full)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from amalgam.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir(), profile=args.profile, log=print)
    experts = [Path(zoo.experts[name]) for name in EXPERTS]
    exe = args.mergekit or ensure_mergekit(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    labels = args.cases.split(",") if args.cases else list(CASES)
    result: dict[str, Any] = {
        "mergekit_version": MERGEKIT_VERSION,
        "zoo": zoo.root.name,
        "machine": machine(),
        "source": source_state(),
        "cases": {},
    }
    for label in labels:
        deterministic, make = CASES[label]
        cfg = make(str(zoo.base), [str(e) for e in experts])
        cfg["dtype"] = "float32"
        slug = label.replace(" ", "-")
        source = args.work / f"{slug}.yml"
        source.write_text(yaml.safe_dump(cfg))
        mk_out, am_out = args.work / f"{slug}-mergekit", args.work / f"{slug}-amalgam"
        mk = run_mergekit(exe, source, mk_out, args.work / f"{slug}-mergekit.log")
        if mk.returncode != 0:
            raise SystemExit(f"mergekit failed on {label}:\n{mk.output}")
        amalgam_s = run_amalgam(source, am_out)
        row: dict[str, Any] = {
            "config": cfg,
            "deterministic": deterministic,
            "amalgam_s": amalgam_s,
            "mergekit_s": mk.wall_s,
        }
        if deterministic:
            row["compare"] = compare(am_out, mk_out)
        else:
            row["amalgam_spread"] = spread(am_out, Path(zoo.base), experts)
            row["mergekit_spread"] = spread(mk_out, Path(zoo.base), experts)
        result["cases"][label] = row
        print(f"{label}: {json.dumps({k: v for k, v in row.items() if k != 'config'})}")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mergekit-parity.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "mergekit-parity.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
