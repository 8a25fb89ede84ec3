"""CUDA check: every registered merge method run on CPU and on CUDA, outputs compared, timed.

On a machine with a GPU, from the repository root (needs only torch, transformers,
safetensors, pydantic, pyyaml, fsspec, psutil, numpy, scipy; estimated at one to two minutes on
one H100, most of it the SVD methods on the CPU side)::

    python benchmarks/cuda_check.py --json cuda_check.json

``--devices cpu,cpu`` runs the same comparison without a GPU (every difference must then be
0); ``--methods ties,fisher`` checks a few methods only. ``--timing-params 0.5e9`` also times
the speed benchmark's merges on both devices against the host-to-device transfer bound
(``cuda_timing.py``: bandwidth, CPU vs GPU seconds, synchronous vs overlapped copies, the GPU's
outputs against the CPU's byte for byte); ``--timing-only`` skips the method rows.

Three families of inputs, built in a temporary folder:

- **bf16 family** (``--layers``, ``--hidden``): a Llama-shaped base and three experts = base +
  small deltas, for the per-tensor methods (plus ``ties`` with ``trim: model``). Continual
  methods (``opcm``, ``continual_*``) absorb the first expert in one run and the other two in
  a second run with ``continue_from`` the first's output; the final outputs are compared.
- **Llama family** (``--llama-layers``, ``--llama-hidden``, ``--examples``): a randomly
  initialised ``LlamaForCausalLM`` base and two experts, saved in bf16 with ``save_pretrained``
  and the zoo's tokenizer, each with a jsonl of its own examples, for the data-driven methods
  (``fisher``, ``regmean``). Each device run has its own ``$AMALGAM_HOME``, so the statistics
  are computed on that device (``MergeOptions.device`` picks it) and never read from the other
  run's cache; the statistics artifacts of the two runs are compared too.

Tolerances. A merged model (bf16) may differ by at most one bf16 ulp per entry (ulp of the
larger magnitude of the two): methods compute in float32 or float64, where the two devices
reduce in different orders and kernels, and the float32 results then round to bf16; one ulp
is what a float32 difference far below bf16's precision can cause when it straddles a rounding
boundary, two would need a float32 error of about 0.4%. DARE masks are drawn on the CPU and
thresholds are exact selections with ties kept, so random and trimming methods agree too.
A statistics artifact (float32 sums over examples and tokens of products from cuBLAS vs the
CPU's kernels; torch's default full-precision float32 matmuls, no TF32) may differ by at most
``STAT_RTOL`` = 1e-4 of each tensor's largest magnitude: rounding gives about 1e-6, and real
faults (other tokens, dropped examples, a lost mask) give 1e-2 or more. The script exits 1 if
any method failed or exceeded its tolerance; each failure is one row with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
from safetensors.torch import save_file

from amalgam.checkpoint import open_checkpoint
from amalgam.device import pick_device
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import MergeError
from amalgam.methods import REGISTRY
from amalgam.methods.needs import LearnedCoefficients
from amalgam.recipe import Recipe, parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_timing  # a sibling script, not a package

# parameters without a default
REQUIRED: dict[str, dict[str, float]] = {"nearswap": {"t": 0.01}}
MAX_ULPS = 1.0  # merged models: at most one ulp of their dtype per entry
STAT_RTOL = 1e-4  # statistics: at most this fraction of each tensor's largest magnitude


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


def llama_family(
    root: Path, layers: int, hidden: int, examples: int, experts: int = 2
) -> tuple[Path, list[tuple[Path, Path]]]:
    """A random-init bf16 LlamaForCausalLM base with the zoo's tokenizer, and experts = base +
    small deltas, each with a jsonl of ``examples`` prompt/answer records of its own."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # statistics load each model: keep the output to the table

    from amalgam.zoo.tasks import ALPHABET
    from amalgam.zoo.tokenizer import build_tokenizer, check_round_trip

    context = 64
    tokenizer = build_tokenizer(context)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    base_state = {k: v.clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    folders: list[Path] = []
    texts: list[str] = []
    for j in range(experts + 1):
        state = {
            k: v if j == 0 else v + torch.randn(v.shape, generator=g) * 1e-3
            for k, v in base_state.items()
        }
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        folder = root / ("llama-base" if j == 0 else f"llama-e{j}")
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    pairs = []
    for j, folder in enumerate(folders[1:], 1):
        records = []
        for _ in range(examples):
            prompt = "".join(rng.choices(ALPHABET, k=rng.randint(4, 16)))
            answer = "".join(rng.choices(ALPHABET, k=rng.randint(2, 8)))
            records.append({"prompt": prompt, "answer": answer})
            texts += [prompt, answer]
        data = root / f"data-e{j}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        pairs.append((folder, data))
    check_round_trip(tokenizer, folders[0], texts)
    return folders[0], pairs


@dataclass
class Comparison:
    """How two runs' tensors differ: largest absolute difference, largest difference in ulps
    (merged models) or relative to each tensor's largest magnitude (statistics)."""

    max_abs: float = 0.0
    max_ulps: float = 0.0
    max_rel: float = 0.0
    identical: int = 0
    tensors: int = 0


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each magnitude of ``x`` (float32 input): eps * 2^(e-1)
    for x = m 2^e, m in [0.5, 1); the smallest normal's spacing at and below it."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.full_like(x, info.eps), exponent - 1)


def compare_folders(a: Path, b: Path) -> Comparison:
    """Compare every tensor of the checkpoints (model folders or files) at ``a`` and ``b``."""
    out = Comparison()
    with open_checkpoint(str(a)) as ca, open_checkpoint(str(b)) as cb:
        if sorted(ca.names()) != sorted(cb.names()):
            raise ValueError(f"{a} and {b} hold different tensor names")
        for name in sorted(ca.names()):
            x, y = ca.tensor(name), cb.tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                raise ValueError(
                    f"tensor '{name}': {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}"
                )
            out.tensors += 1
            if torch.equal(x, y):
                out.identical += 1
                continue
            xf, yf = x.float(), y.float()
            diff = (xf - yf).abs().nan_to_num(nan=float("inf"))  # a NaN on one side fails
            top = float(xf.abs().max())
            out.max_abs = max(out.max_abs, float(diff.max()))
            out.max_ulps = max(
                out.max_ulps, float((diff / ulp(xf.abs().maximum(yf.abs()), x.dtype)).max())
            )
            out.max_rel = max(out.max_rel, float(diff.max()) / top if top > 0 else float("inf"))
    return out


Runner = Callable[[str, Path, Path], None]  # (device, output folder, $AMALGAM_HOME to use)


@dataclass
class Case:
    """One row: a method (with parameters) run once per device by ``run(device, out, home)``."""

    label: str
    kind: str  # "per-tensor" | "continual" | "data"
    method: str
    run: Runner
    seconds: dict[str, float] = field(default_factory=dict)


def recipe(method: str, params: dict, models: list[dict], base: Path | None, out: Path) -> Recipe:
    data: dict[str, Any] = {"method": method, "params": params, "models": models}
    if base is not None:
        data["base"] = str(base)
    return parse_recipe({**data, "output": str(out)})


def build_cases(methods: list[str], root: Path, args: argparse.Namespace) -> list[Case]:
    """The rows to run, their input families built in ``root`` (the Llama one only if needed)."""
    base, *experts = synthetic_family(root, args.layers, args.hidden)
    llama: list[tuple[Path, Path]] = []
    llama_base = None
    if any(REGISTRY[m].reads_data for m in methods):
        llama_base, llama = llama_family(root, args.llama_layers, args.llama_hidden, args.examples)
    cases = []
    variants = [(m, m, {}) for m in methods]
    if "ties" in methods:
        variants.append(("ties trim=model", "ties", {"trim": "model"}))
    for label, name, params in variants:
        method = REGISTRY[name]
        if method.continual:
            cases.append(Case(label, "continual", name, continual_run(name, params, base, experts)))
        elif method.learns:  # a short schedule: the check is the devices' agreement
            short = {p.name: 2 for p in method.params if p.name in ("steps", "mask_steps")}
            run = data_run(name, {**params, **short}, llama, llama_base)
            cases.append(Case(label, "data", name, run))
        elif method.reads_data:
            cases.append(Case(label, "data", name, data_run(name, params, llama)))
        else:
            one = name == "slerp" or method.max_models == 1
            models = experts[:2] if name == "nuslerp" else experts[:1] if one else experts
            params = {**REQUIRED.get(name, {}), **params}
            cases.append(Case(label, "per-tensor", name, one_shot_run(name, params, base, models)))
    return cases


def one_shot_run(name: str, params: dict, base: Path, models: list[Path]) -> Runner:
    def run(device: str, out: Path, home: Path) -> None:
        uris = [{"uri": str(m)} for m in models]
        needs_base = REGISTRY[name].needs_base or name == "slerp"
        r = recipe(name, params, uris, base if needs_base else None, out)
        run_merge(r, MergeOptions(device=device))

    return run


def continual_run(name: str, params: dict, base: Path, models: list[Path]) -> Runner:
    """The first model absorbed in one run, the rest in a second run continuing from it."""

    def run(device: str, out: Path, home: Path) -> None:
        first = out.with_name(out.name + "-step1")
        uris = [{"uri": str(m)} for m in models]
        run_merge(recipe(name, params, uris[:1], base, first), MergeOptions(device=device))
        options = MergeOptions(device=device, continue_from=str(first))
        run_merge(recipe(name, params, uris[1:], base, out), options)

    return run


def data_run(
    name: str, params: dict, experts: list[tuple[Path, Path]], base: Path | None = None
) -> Runner:
    """Experts with their data, no base for the statistics methods (neither reads one), the
    base for the learned ones; statistics or coefficients computed on ``device`` into
    ``home``'s cache (a fresh one per run)."""

    def run(device: str, out: Path, home: Path) -> None:
        uris = [{"uri": str(m), "data": str(d)} for m, d in experts]
        with amalgam_home(home):
            run_merge(recipe(name, params, uris, base, out), MergeOptions(device=device))

    return run


@contextmanager
def amalgam_home(path: Path) -> Iterator[None]:
    """``$AMALGAM_HOME`` (where statistics are cached) set to ``path`` meanwhile."""
    with patch.dict(os.environ, {"AMALGAM_HOME": str(path)}):
        yield


def run_case(case: Case, devices: list[str], root: Path) -> list[dict[str, Any]]:
    """Run ``case`` on each device and compare; rows for the merge (and its statistics)."""
    slug = case.label.replace(" ", "_").replace("=", "-")
    row: dict[str, Any] = {"label": case.label, "kind": case.kind, "method": case.method}
    outs, homes = [], []
    stage = "compare"
    try:
        for i, device in enumerate(devices):
            stage = f"on {run_name(devices, i)}"
            out, home = root / f"{slug}-{i}", root / f"home-{slug}-{i}"
            start = time.perf_counter()
            case.run(device, out, home)
            case.seconds[run_name(devices, i)] = time.perf_counter() - start
            outs.append(out)
            homes.append(home)
        stage = "compare"
        row |= compared(compare_folders(*outs), "ulps")
    except Exception as exc:  # one method's failure must not hide the others'
        row["error"] = f"{stage}: {type(exc).__name__}: {exc}".splitlines()[0]
        row["traceback"] = traceback.format_exc()
    row["seconds"] = dict(case.seconds)
    rows = [row]
    if case.kind == "data" and len(homes) == 2:
        rows.append(compare_statistics(case, homes))
    return rows


def compare_statistics(case: Case, homes: list[Path]) -> dict[str, Any]:
    """The statistics (or learned coefficients) artifacts both runs computed, paired by cache
    key, compared."""
    label = f"{case.label} statistics"
    row: dict[str, Any] = {"label": label, "kind": "statistics", "method": case.method}
    row["seconds"] = {}  # their time is part of the merge's row
    # learned coefficients have their own cache folder; DAM's masks are statistics artifacts
    folder = "learned" if REGISTRY[case.method].need(LearnedCoefficients) else "statistics"
    try:
        files = [sorted(p.name for p in (h / folder).glob("*.safetensors")) for h in homes]
        if not files[0] or files[0] != files[1]:
            raise ValueError(f"artifacts differ or are missing: {files[0]} vs {files[1]}")
        total = Comparison()
        for name in files[0]:
            c = compare_folders(*(h / folder / name for h in homes))
            total.max_abs = max(total.max_abs, c.max_abs)
            total.max_rel = max(total.max_rel, c.max_rel)
            total.identical += c.identical
            total.tensors += c.tensors
        row |= compared(total, "rel")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return row


def compared(c: Comparison, measure: str) -> dict[str, Any]:
    """A row's comparison fields; ``measure`` names the toleranced figure (ulps or rel)."""
    value, limit = (c.max_ulps, MAX_ULPS) if measure == "ulps" else (c.max_rel, STAT_RTOL)
    return {
        "max_abs": c.max_abs,
        "measure": measure,
        "value": value,
        "tolerance": limit,
        "identical": c.identical,
        "tensors": c.tensors,
        "ok": value <= limit,
    }


def run_name(devices: list[str], i: int) -> str:
    """``cpu``, ``cuda``; a repeated device is told apart by its position (``cpu#2``)."""
    return devices[i] if devices.index(devices[i]) == i else f"{devices[i]}#{i + 1}"


def table(rows: list[dict[str, Any]], devices: list[str]) -> str:
    names = [run_name(devices, i) for i in range(len(devices))]
    times = " | ".join(f"{n} s" for n in names)
    lines = [
        f"| method | kind | {times} | max abs diff | max diff (tolerance) | identical | result |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for r in rows:
        secs = " | ".join(f"{r['seconds'][n]:.2f}" if n in r["seconds"] else "-" for n in names)
        if "error" in r:
            error = r["error"].replace("|", "/")
            lines.append(f"| {r['label']} | {r['kind']} | {secs} | - | - | - | failed: {error} |")
            continue
        unit = "ulp" if r["measure"] == "ulps" else "x max"
        lines.append(
            f"| {r['label']} | {r['kind']} | {secs} | {r['max_abs']:.2e} | "
            f"{r['value']:.3g} {unit} (<= {r['tolerance']:g}) | {r['identical']}/{r['tensors']} "
            f"| {'ok' if r['ok'] else 'OVER TOLERANCE'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cpu,cuda", help="two devices to compare")
    ap.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--layers", type=int, default=4, help="bf16 family: layers")
    ap.add_argument("--hidden", type=int, default=1024, help="bf16 family: hidden size")
    ap.add_argument("--llama-layers", type=int, default=2, help="Llama family: layers")
    ap.add_argument("--llama-hidden", type=int, default=128, help="Llama family: hidden size")
    ap.add_argument("--examples", type=int, default=32, help="Llama family: examples per expert")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--work", type=Path, help="folder for inputs and outputs (default: temp)")
    ap.add_argument(
        "--timing-params", type=float, default=0.0, help="also time merges of this size"
    )
    ap.add_argument("--timing-only", action="store_true", help="no method rows, only the timing")
    args = ap.parse_args(argv)
    devices = args.devices.split(",")
    methods = args.methods.split(",") if args.methods else sorted(REGISTRY)
    unknown = [m for m in methods if m not in REGISTRY]
    if len(devices) != 2 or unknown:
        ap.error(f"need two devices and known methods (unknown: {unknown})")
    try:
        for d in devices:
            torch.empty(1, device=pick_device(d))  # start CUDA before the first row is timed
    except MergeError as exc:
        print(f"cuda_check: {exc}", file=sys.stderr)
        return 2
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, cuda device: {cuda}, devices compared: {devices}")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    timing = None
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        if args.timing_params:
            work = root / "timing" if args.work else cuda_timing.speed.WORK
            work.mkdir(parents=True, exist_ok=True)
            timing = cuda_timing.run(devices, args.timing_params, work, compare_folders)
            print(cuda_timing.markdown(timing), flush=True)
        for case in [] if args.timing_only else build_cases(methods, root, args):
            new = run_case(case, devices, root)
            rows += new
            times = ", ".join(f"{n} {t:.1f} s" for n, t in case.seconds.items())
            status = "failed" if any("error" in r for r in new) else "done"
            print(f"{case.label}: {status} ({times})", flush=True)
    if rows:
        print(table(rows, devices))
    print(f"total {time.perf_counter() - start:.0f} s")
    for r in rows:
        if "traceback" in r:
            print(f"\n{r['label']}:\n{r.pop('traceback')}", file=sys.stderr)
    failed = [r["label"] for r in rows if "error" in r or not r["ok"]]
    failed += cuda_timing.failures(timing, MAX_ULPS) if timing else []
    if args.json:
        result = {"devices": devices, "cuda": cuda, "rows": rows, "timing": timing}
        args.json.write_text(json.dumps(result, indent=1))
    checked = len(rows) + (len(timing["rows"]) if timing else 0)
    print(f"{checked - len(failed)}/{checked} rows ok" + (f"; not ok: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
