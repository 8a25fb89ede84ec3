"""The library's command line (typer): inspect, merge, methods, stats, zoo, evaluate, compress,
decompress, twin (Twin-Merging), moe (an MoE from dense experts), permute, align (connectivity
report), extract-lora, transplant (a donor's tokenizer), policy (the registry's promotion
gates), card (a registered model's Hugging Face card), batch (many recipes on one Ray cluster),
soup (a greedy soup of a recipe's models).
The orchestration layer adds the pipeline commands (run, nightly, sweep, search, promote, serve) to
this ``app`` in ``flows/cli.py``, the ``amalgam`` entry point."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from amalgam.errors import AmalgamError

if TYPE_CHECKING:
    from amalgam.engine import MergeOptions, MergeResult
    from amalgam.recipe import Recipe

app = typer.Typer(
    help="amalgam: streaming, reproducible model merging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
zoo_app = typer.Typer(help="The benchmark model zoo.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()

StorageOpt = Annotated[
    str | None,
    typer.Option("--storage-options", help="JSON fsspec storage options (e.g. s3 endpoint/keys)"),
]


def _storage(options: str | None) -> dict[str, Any]:
    if not options:
        return {}
    try:
        value = json.loads(options)
    except json.JSONDecodeError as exc:
        raise AmalgamError(f"--storage-options: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise AmalgamError("--storage-options: expected a JSON object")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help="model folder, .safetensors file, adapter, s3://...")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="read .bin/.pt pickle files")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """List a checkpoint's tensors, size, architecture, shards and content hash."""
    # lazy: torch; `amalgam --help` and typos stay fast
    from amalgam.checkpoint import open_checkpoint

    with open_checkpoint(uri, allow_pickle=allow_pickle, **_storage(storage_options)) as ckpt:
        config = ckpt.config or {}
        report = {
            "uri": ckpt.uri,
            "kind": ckpt.kind,
            "architecture": (config.get("architectures") or [config.get("peft_type")])[0],
            "files": ckpt.files,
            "parameters": ckpt.num_params,
            "bytes": ckpt.nbytes,
            "content_hash": ckpt.content_hash(),
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                for t in ckpt.tensors.values()
            ],
        }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table("tensor", "shape", "dtype", "bytes", title=report["uri"])
    for t in report["tensors"]:
        table.add_row(t["name"], str(t["shape"]), t["dtype"], _human(t["bytes"]))
    console.print(table)
    console.print(
        f"kind {report['kind']}, architecture {report['architecture']}, "
        f"{report['parameters']:,} parameters, {_human(report['bytes'])} in "
        f"{len(report['files'])} file(s): {', '.join(report['files'])}\n"
        f"content hash {report['content_hash']}",
        soft_wrap=True,
    )


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str, option: str) -> int:
    """``256MB``, ``1GiB``, ``1000000`` -> bytes; anything else is an error naming ``option``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise AmalgamError(f"{option}: '{text}' is not a size (e.g. 256MB, 1GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="amalgam recipe or mergekit YAML")],
    output: Annotated[str | None, typer.Option(help="output folder or URI")] = None,
    executor: Annotated[
        str | None, typer.Option(help="local | ray (default: the recipe's, else local)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="read .bin/.pt pickle inputs")] = False,
    threads: Annotated[
        int | None, typer.Option(help="compute threads (default: all cores)")
    ] = None,
    plan_only: Annotated[
        bool, typer.Option("--plan", help="print the plan, merge nothing")
    ] = False,
    continue_from: Annotated[
        str | None,
        typer.Option(
            "--continue-from",
            metavar="STATE",
            help="continual methods: absorb the recipe's models into this earlier merge",
        ),
    ] = None,
    unit_size: Annotated[
        str, typer.Option(help="Ray: input bytes per task, e.g. 256MB, 1GiB")
    ] = "256MiB",
    gpus_per_task: Annotated[
        float | None,
        typer.Option(
            help="Ray: GPUs per task where the cluster has any (default: 1 for SVD/solve-bound "
            "methods such as tsv_m, opcm, regmean, else 0; fractions share a GPU)"
        ),
    ] = None,
    memory_budget: Annotated[
        str,
        typer.Option(
            help="tensor bytes held at once besides the libraries (per Ray worker), e.g. 1.5GB: "
            "a quarter reads ahead, a quarter waits for the disk; a tensor whose inputs from "
            "every model, in float32, exceed the other half is merged one model at a time "
            "(linear, task_arithmetic, ties, dare_*, breadcrumbs: same bytes)"
        ),
    ] = "1GiB",
) -> None:
    """Merge the models of a recipe into a Hugging Face model folder."""
    # lazy: the command's modules import torch; `amalgam --help` stays fast
    from pydantic import ValidationError

    from amalgam.engine import MergeOptions, plan_recipe
    from amalgam.recipe import load_recipe

    recipe = load_recipe(config)
    try:
        options = MergeOptions(
            output=output,
            executor=executor or recipe.executor or "local",
            device=device,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            threads=threads,
            continue_from=continue_from,
            unit_bytes=parse_bytes(unit_size, "--unit-size"),
            gpus_per_task=gpus_per_task,
            memory_budget=parse_bytes(memory_budget, "--memory-budget"),
        )
    except ValidationError as exc:
        bad = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise AmalgamError(bad) from None
    if recipe.align is not None and recipe.align.method != "check":
        # lazy: amalgam.stages loads every stage (compression pulls in scipy)
        from amalgam.stages.align import aligned_options

        options = aligned_options(recipe, options)
    if plan_only:
        console.print(plan_recipe(recipe, options).describe())
        return
    _print_merge(recipe, _merge_with_progress(recipe, options))


def _merge_with_progress(recipe: Recipe, options: MergeOptions) -> MergeResult:
    """Run the merge under a progress bar on stderr (bytes read, tensors merged)."""
    # lazy: torch
    from amalgam.adapters.adapter_output import merge_recipe

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        bytes_task = bar.add_task("reading", total=None)
        tensors = [0]

        def progress(nbytes: int, ntensors: int) -> None:
            tensors[0] += ntensors
            bar.update(bytes_task, advance=nbytes, description=f"merged {tensors[0]} tensors")

        return merge_recipe(recipe, options, progress)


def _print_merge(recipe: Recipe, result: MergeResult) -> None:
    """The merge's summary: inputs, output, sizes, speed, peak memory, unmerged tensors."""
    plan = result.plan
    console.print(
        f"[bold]merged[/] {len(plan.labels)} inputs with {recipe.method} -> {result.output}\n"
        f"{len(plan.jobs)} tensors in {len(plan.units)} shard(s), "
        f"{_human(plan.output_bytes)} written, {_human(result.input_bytes)} read in "
        f"{result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s), "
        f"peak RSS {_human(result.peak_rss_bytes)}"
        + (
            f" (driver); Ray workers: {_human(max(result.worker_peaks))} the largest of "
            f"{len(result.worker_peaks)}, {_human(result.worker_peak_sum)} together at most"
            if result.worker_peaks
            else ""
        ),
        soft_wrap=True,
    )
    # tensors only some inputs hold (the recipe's extra_tensors)
    if plan.kept:
        kept = ", ".join(f"{n} (from {label})" for n, label in plan.kept.items())
        console.print(f"copied unmerged: {kept}", soft_wrap=True)
    if plan.dropped:
        console.print(f"left out: {', '.join(plan.dropped)}", soft_wrap=True)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    # lazy: torch
    from amalgam.methods import REGISTRY

    table = Table("method", "parameters (default)", "what it does", "paper")
    for name in sorted(REGISTRY):
        m = REGISTRY[name]
        params = ", ".join(
            f"{p.name}{'*' if p.per_model else ''}="
            f"{'(required)' if p.default is None else p.default}"
            for p in m.params
        )
        table.add_row(name, params, m.summary, m.paper)
    console.print(table)
    console.print("* settable per model; numeric values may be lists (layer gradients)")
    console.print(
        "every method: a tensor only some inputs hold is an error, unless the recipe sets "
        "extra_tensors: keep_from_first (copied unmerged from the first input that has it) or "
        "drop (left out); the base's non-float buffers are copied",
        soft_wrap=True,
    )


@app.command()
def stats(
    model: Annotated[str, typer.Argument(help="local Hugging Face model folder")],
    data: Annotated[str, typer.Option(help="task folder (validation split) or jsonl file")],
    kind: Annotated[str, typer.Option(help="fisher | gram")],
    output: Annotated[
        str | None, typer.Option(help="artifact URI (default: the cache under $AMALGAM_HOME)")
    ] = None,
    samples: Annotated[int, typer.Option(help="examples of the data to use")] = 256,
    fisher: Annotated[
        str, typer.Option(help="exact | sampled | empirical (Fisher targets)")
    ] = "exact",
    draws: Annotated[int, typer.Option(help="label draws per example (--fisher sampled)")] = 1,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    storage_options: StorageOpt = None,
) -> None:
    """Compute a model's Fisher diagonals or linear-layer input Grams on data (cached)."""
    # lazy: torch
    from amalgam.statistics import cached_statistics, compute_statistics
    from amalgam.statistics.compute import settings_for

    settings = settings_for(kind, samples, fisher, draws)
    options = _storage(storage_options)
    start = time.perf_counter()
    if output:
        info = compute_statistics(model, data, kind, settings, output, device=device, **options)
        computed = True
    else:
        info, computed = cached_statistics(model, data, kind, settings, device=device, **options)
    console.print(
        f"{info.kind} statistics of {model}: {len(info.shapes)} tensors, {info.samples} "
        f"examples, {info.tokens} tokens, "
        + (f"computed in {time.perf_counter() - start:.1f} s" if computed else "from the cache")
        + f"\ncontent hash {info.content_hash}",
        soft_wrap=True,
    )
    print(info.uri)


@zoo_app.command("build")
def zoo_build(
    out: Annotated[Path | None, typer.Option(help="zoo folder (default .amalgam/zoo)")] = None,
    profile: Annotated[str, typer.Option(help="full | tiny")] = "full",
    force: Annotated[bool, typer.Option(help="rebuild even when cached")] = False,
    variants: Annotated[
        bool, typer.Option(help="also build the alignment variants (docs/zoo.md)")
    ] = False,
) -> None:
    """Build (or reuse) the benchmark zoo: base, experts, LoRA adapters, MoE, tasks; prints
    its folder on stdout (progress goes to stderr). With --variants, also the alignment
    variants beside it, whose folder is printed on a second line."""
    # lazy: torch
    from amalgam.zoo.build import build_zoo

    progress = Console(stderr=True)  # stdout carries only the zoo folder, for scripts
    zoo = build_zoo(out, profile=profile, force=force, log=lambda m: progress.print(m))
    progress.print(f"zoo ready at {zoo.root}")
    print(zoo.root)
    if variants:
        # lazy: torch, as above
        from amalgam.zoo.variants import build_variants

        built = build_variants(zoo, force=force, log=lambda m: progress.print(m))
        progress.print(f"variants ready at {built.root}")
        print(built.root)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Argument(help="model folder(s) or URI(s) to evaluate")],
    tasks: Annotated[
        str | None, typer.Option(help="comma-separated task names: task folders, lm-eval tasks")
    ] = None,
    tasks_dir: Annotated[
        Path | None, typer.Option(help="folder of amalgam task folders (default: the zoo's)")
    ] = None,
    include_path: Annotated[
        list[str] | None, typer.Option(help="folder of lm-eval task YAMLs (repeatable)")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="examples per task")] = None,
    split: Annotated[str, typer.Option(help="test | validation")] = "test",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = "float32",
    batch_size: Annotated[str, typer.Option(help="examples per batch, or auto")] = "32",
    max_gen_toks: Annotated[
        int | None, typer.Option(help="cap on generated tokens per answer (generate_until)")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print JSON with per-example results")
    ] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Run lm-eval offline on models; print each task's primary score (acc, exact_match,
    word_perplexity...)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request progress bars
    # lazy: lm-eval, torch and the zoo behind the command
    from pydantic import ValidationError

    from amalgam.evaluate.report import spec_tasks
    from amalgam.evaluate.score import score_model
    from amalgam.recipe import EvaluateSpec
    from amalgam.zoo.lm_tasks import GENERATIVE_TASK, GROUP
    from amalgam.zoo.tasks import TASKS

    names = tasks.split(",") if tasks else None
    zoo_names = {*TASKS, GENERATIVE_TASK, GROUP}
    if tasks_dir is None and not include_path and set(names or zoo_names) <= zoo_names:
        # lazy: torch
        from amalgam.zoo.build import build_zoo

        tasks_dir = build_zoo(log=lambda m: None).tasks_dir
    settings = {
        "tasks_dir": None if tasks_dir is None else str(tasks_dir),
        "tasks": names,
        "include_path": include_path or [],
        "limit": limit,
        "split": split,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size if batch_size == "auto" else _integer(batch_size),
        "max_gen_toks": max_gen_toks,
    }
    try:
        spec = EvaluateSpec(**settings)
    except ValidationError as exc:
        bad = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise AmalgamError(bad) from None
    leaves = spec_tasks(spec)
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints notes: stdout is the result
        results = {m: score_model(m, spec, leaves, **_storage(storage_options)) for m in model}
    if as_json:
        print(json.dumps({uri: r.model_dump(mode="json") for uri, r in results.items()}))
        return
    table = Table(
        "model", *(f"{t}\n{next(iter(results.values())).tasks[t].metric}" for t in leaves)
    )
    for uri, result in results.items():
        table.add_row(uri, *(f"{result.tasks[t].accuracy:.4f}" for t in leaves))
    Console(width=max(console.width, 120)).print(table)


def _integer(text: str) -> int | str:
    """``text`` as an integer when it is one (pydantic names the option otherwise)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


@app.command()
def compress(
    models: Annotated[
        list[str],
        typer.Argument(
            help="fine-tuned model or PEFT adapter folder or URI; with --method tall, the "
            "experts (NAME=URI, or URI named by its last path part)"
        ),
    ],
    output: Annotated[str, typer.Option(help="compressed model folder or URI")],
    base: Annotated[
        str | None,
        typer.Option(help="the base it was fine-tuned from (optional for an adapter)"),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="compeft (one model) | tall (masks over several experts) | mc_smoe (an MoE's "
            "experts)"
        ),
    ] = "compeft",
    density: Annotated[float, typer.Option(help="share of each task vector kept")] = 0.1,
    scale: Annotated[str, typer.Option(help="mean | std (ComPEFT's alpha * std)")] = "mean",
    alpha: Annotated[float, typer.Option(help="multiplier of the scale")] = 1.0,
    keep_dense: Annotated[
        str | None, typer.Option(help="regex of tensors stored uncompressed")
    ] = None,
    tall_lambda: Annotated[
        float, typer.Option(help="TALL mask threshold: keep where |t| > lambda |tau_MTL - t|")
    ] = 0.4,
    experts: Annotated[int | None, typer.Option(help="mc_smoe: experts kept per layer")] = None,
    calibration: Annotated[
        str | None, typer.Option(help="mc_smoe: calibration jsonl or task folder")
    ] = None,
    calibration_samples: Annotated[int, typer.Option(help="mc_smoe: records used")] = 256,
    expert_merge: Annotated[
        str, typer.Option(help="mc_smoe: frequency | uniform | drop")
    ] = "frequency",
    align: Annotated[bool, typer.Option(help="mc_smoe: permutation-align group members")] = True,
    router_fold: Annotated[
        str, typer.Option(help="mc_smoe: a group's router row, dominant | average")
    ] = "dominant",
    losparse_rank: Annotated[
        int | None,
        typer.Option(help="mc_smoe: store merged experts as rank-r SVD + sparse residual"),
    ] = None,
    losparse_density: Annotated[
        float, typer.Option(help="mc_smoe: share of each expert's residual entries kept")
    ] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Compress a fine-tune against its base, or an adapter's tensors (ComPEFT: top-k task
    vector as sign x scale), or several experts of one base as TALL masks (one multi-task
    vector plus one bit mask per task), or an MoE to fewer experts per layer (MC-SMoE)."""
    # lazy: the command's modules import torch; `amalgam --help` stays fast
    from pydantic import ValidationError

    # lazy: torch
    from amalgam.compress import compress_model, compress_moe
    from amalgam.compress.tall import compress_tall
    from amalgam.recipe import CompressSpec

    try:
        spec = CompressSpec(
            method=method,
            density=density,
            scale=scale,
            alpha=alpha,
            keep_dense=keep_dense,
            tall_lambda=tall_lambda,
            experts=experts,
            calibration=calibration,
            calibration_samples=calibration_samples,
            expert_merge=expert_merge,
            align=align,
            router_fold=router_fold,
            losparse_rank=losparse_rank,
            losparse_density=losparse_density,
        )
    except ValidationError as exc:
        bad = "; ".join(
            (f"--{str(e['loc'][0]).replace('_', '-')}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors()
        )
        raise AmalgamError(bad) from None
    so = _storage(storage_options)
    if spec.method == "mc_smoe":
        if len(models) != 1:
            raise AmalgamError(f"--method mc_smoe compresses one MoE; got {len(models)}")
        model = models[0]
        moe = compress_moe(model, output, spec, overwrite=overwrite, **so)
        summary = moe.summary() | {"skipped": moe.skipped}
        if as_json:
            print(json.dumps(summary, indent=2))
            return
        console.print(
            f"[bold]compressed[/] {model} -> {moe.output}"
            + (" (already there)" if moe.skipped else "")
            + f"\n{moe.report['experts_before']} -> {spec.experts} experts per layer; "
            f"{summary['params_before']:,} -> {summary['params_after']:,} parameters, "
            f"{summary['bytes_before']:,} -> {summary['bytes_after']:,} bytes",
            soft_wrap=True,
        )
        return
    if spec.method == "tall":
        if base is None:
            raise AmalgamError("--method tall: give the experts' base (--base)")
        result = compress_tall(_named(models), base, output, spec, overwrite=overwrite, **so)
    elif len(models) != 1:
        raise AmalgamError(f"--method compeft compresses one model; got {len(models)}")
    else:
        result = compress_model(models[0], base, output, spec, overwrite=overwrite, **so)
    summary = result.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]compressed[/] {', '.join(models)} -> {result.output}\n"
        f"{summary['kept']:,} of {summary['parameters']:,} entries kept; "
        f"{_human(result.dense_bytes)} -> {result.compressed_bytes:,} bytes "
        f"({result.ratio:.1f}x smaller; config and tokenizer files: {result.side_bytes:,} bytes)",
        soft_wrap=True,
    )


def _named(models: list[str]) -> dict[str, str]:
    """NAME=URI arguments (or URIs, named by their last path part) as name -> URI; a name
    given twice is an error."""
    named: dict[str, str] = {}
    for arg in models:
        name, sep, uri = arg.partition("=")
        if not sep or "/" in name:
            name, uri = PurePosixPath(arg.rstrip("/")).name, arg
        if name in named:
            raise AmalgamError(f"expert name {name!r} given twice (name them: NAME=URI)")
        named[name] = uri
    return named


@app.command()
def decompress(
    compressed: Annotated[str, typer.Argument(help="compressed model folder or URI")],
    output: Annotated[str, typer.Option(help="model or adapter folder or URI to write")],
    base: Annotated[
        str | None, typer.Option(help="the base (default: the one recorded at compression)")
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="the expert to rebuild from TALL storage")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Rebuild a dense Hugging Face model folder (or a PEFT adapter folder) from a compressed
    model and its base; from TALL storage, the expert ``--task``."""
    # lazy: torch
    from amalgam.compress import decompress_model

    out = decompress_model(
        compressed, base, output, overwrite=overwrite, task=task, **_storage(storage_options)
    )
    console.print(f"[bold]decompressed[/] {compressed} -> {out}", soft_wrap=True)


@app.command()
def twin(
    recipe_path: Annotated[
        Path, typer.Argument(help="merge recipe of the shared model (TA, TIES)")
    ],
    output: Annotated[str, typer.Option(help="Twin folder or URI to write")],
    tasks_dir: Annotated[
        Path, typer.Option(help="task folders, one per model label: the router's data")
    ],
    rank: Annotated[
        int | None, typer.Option(help="singular values kept per 2-D tensor and task")
    ] = None,
    share: Annotated[
        float | None, typer.Option(help="or: kept share of each tensor's min(m, n), e.g. 0.1")
    ] = None,
    router_split: Annotated[str, typer.Option(help="train | validation")] = "train",
    router_limit: Annotated[int, typer.Option(help="router records per task")] = 64,
    shared_output: Annotated[
        str | None, typer.Option(help="where the shared merge is kept (default <output>.shared)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Twin-Merging (arXiv 2406.15479): the recipe's merge as shared model, each expert's
    difference to it as rank-r SVD factors, and a router that mixes them per input."""
    # lazy: the command's modules import torch
    from pydantic import ValidationError

    from amalgam.recipe import load_recipe
    from amalgam.twin.build import build_twin
    from amalgam.twin.spec import TwinSpec

    try:
        spec = TwinSpec(
            rank=rank,
            share=share,
            tasks_dir=str(tasks_dir),
            router_split=router_split,
            router_limit=router_limit,
            shared_output=shared_output,
        )
    except ValidationError as exc:
        bad = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise AmalgamError(bad) from None
    result = build_twin(load_recipe(recipe_path), spec, output, overwrite=overwrite)
    summary = {
        "output": result.output,
        "skipped": result.skipped,
        "shared_reused": result.shared_reused,
        "stored_bytes": result.stored_bytes,
        "experts_bytes": result.experts_bytes,
        "router_accuracy": result.router_accuracy,
        "files": result.files,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    verb = "already built" if result.skipped else "built"
    console.print(
        f"[bold]{verb}[/] {result.output}: {result.stored_bytes:,} bytes (shared "
        f"{result.shared_bytes:,}, factors {result.factor_bytes:,}, router "
        f"{result.router_bytes:,}) for experts of {result.experts_bytes:,} bytes; router "
        f"task accuracy {result.router_accuracy:.1%} on held-out records",
        soft_wrap=True,
    )


@app.command()
def moe(
    config: Annotated[str, typer.Argument(help="mergekit-moe YAML (base_model, experts, ...)")],
    output: Annotated[str, typer.Option(help="MoE model folder or URI to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    max_shard_size: Annotated[str, typer.Option(help="largest output shard")] = "5GB",
    storage_options: StorageOpt = None,
) -> None:
    """Build a Mixtral-style MoE from dense experts: their MLPs as experts, everything else
    from the base, routers from prompts (gate_mode hidden | cheap_embed | random)."""
    # lazy: torch
    from amalgam.moe import build_moe, load_moe_config

    spec = load_moe_config(config)
    result = build_moe(
        spec,
        output,
        overwrite=overwrite,
        max_shard_size=parse_bytes(max_shard_size, "--max-shard-size"),
        storage_options=_storage(storage_options),
    )
    verb = "already built" if result.skipped else "built"
    digest = result.content_hash.removeprefix("sha256:")[:12]
    console.print(
        f"[bold]{verb}[/] {result.output}: {result.experts} experts x {result.layers} layers, "
        f"{result.num_params:,} parameters, content hash {digest}",
        soft_wrap=True,
    )


@app.command()
def permute(
    model: Annotated[str, typer.Argument(help="model folder or URI")],
    output: Annotated[str, typer.Argument(help="folder or URI to write the permuted copy to")],
    seed: Annotated[int, typer.Option(help="seed of the random permutation")] = 0,
    residual: Annotated[bool, typer.Option(help="permute the residual stream too")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Write a copy of MODEL with its hidden units randomly permuted: the same function in
    another basis (docs/align-permutation.md)."""
    # lazy: torch
    from amalgam import storage
    from amalgam.align.permutation.apply import permuted_copy

    options = _storage(storage_options)
    fs, path = storage.resolve(output, **options)
    if fs.exists(path) and not overwrite:
        raise AmalgamError(f"{output}: exists; pass --overwrite to replace it")
    permuted_copy(model, output, seed, residual=residual, **options)
    console.print(f"[bold]permuted[/] {model} -> {output} (seed {seed})", soft_wrap=True)


@app.command()
def align(
    model_a: Annotated[str, typer.Argument(help="model folder (t = 0)")],
    model_b: Annotated[str, typer.Argument(help="model folder (t = 1), same architecture")],
    report: Annotated[Path, typer.Option(help="folder for connectivity.{json,md,png}")],
    method: Annotated[
        str | None,
        typer.Option("--align", help="also after aligning B onto A: weight_matching | ..."),
    ] = None,
    data: Annotated[str | None, typer.Option(help="activation data (task folder)")] = None,
    residual: Annotated[bool, typer.Option(help="align the residual stream too")] = False,
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(help="zoo-style task folder")] = None,
    limit: Annotated[int | None, typer.Option(help="test records per task")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
) -> None:
    """Linear mode connectivity of two models: loss and task accuracy at 11 points of the path
    (1-t) A + t B, and the barrier height (docs/align-connectivity.md)."""
    # lazy: torch and the zoo
    from amalgam.align.connectivity import connectivity_report
    from amalgam.zoo.build import build_zoo

    if tasks_dir is None:
        tasks_dir = build_zoo(log=lambda m: None).tasks_dir
    names = (
        tasks.split(",")
        if tasks
        else sorted(p.name for p in tasks_dir.iterdir() if (p / "test.jsonl").is_file())
    )
    curves, files = connectivity_report(
        model_a,
        model_b,
        report,
        tasks_dir,
        names,
        align=method,
        data=data,
        residual=residual,
        limit=limit,
        device=device,
    )
    for curve in curves:
        console.print(f"[bold]{curve.label}[/]: barrier {curve.barrier:.3f} nats", soft_wrap=True)
    console.print("report: " + ", ".join(str(f) for f in files), soft_wrap=True)


@app.command("extract-lora")
def extract_lora(
    base: Annotated[str, typer.Argument(help="the base model folder or URI")],
    model: Annotated[str, typer.Argument(help="the fine-tuned (or merged) model folder or URI")],
    output: Annotated[str, typer.Option(help="adapter folder or URI to write")],
    rank: Annotated[int | None, typer.Option(help="rank of every LoRA module (default 16)")] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="instead of --rank: per module, the smallest rank keeping this share"),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="comma-separated module names or suffixes (default: all 2-D weights "
            "but the embeddings)"
        ),
    ] = None,
    save_modules: Annotated[
        bool,
        typer.Option(
            "--save-modules/--drop-modules",
            help="changed tensors outside the targets (embeddings, norms): saved whole in "
            "modules_to_save, or left out",
        ),
    ] = True,
    base_name: Annotated[
        str | None,
        typer.Option(help="base_model_name_or_path to record (default: the base's location)"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (where the SVDs run)")] = "auto",
    threads: Annotated[
        int | None, typer.Option(help="compute threads (default: all cores)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, energy per module")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Extract a PEFT LoRA adapter from MODEL - BASE by truncated SVD of each module's delta."""
    # lazy: torch
    from amalgam.adapters.extract import extract_lora as extract

    result = extract(
        base,
        model,
        output,
        rank=rank,
        energy=energy,
        targets=targets.split(",") if targets else None,
        save_modules=save_modules,
        base_name=base_name,
        device=device,
        threads=threads,
        overwrite=overwrite,
        **_storage(storage_options),
    )
    summary = result.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]extracted[/] {model} -> {result.output}\n"
        f"{summary['modules']} LoRA modules, rank {'/'.join(map(str, summary['ranks']))}, "
        f"energy kept min {summary['energy_min']:.4f} mean {summary['energy_mean']:.4f}\n"
        f"saved whole: {', '.join(result.saved) or 'none'}"
        + (f"\nleft out (changed): {', '.join(result.dropped)}" if result.dropped else ""),
        soft_wrap=True,
    )


@app.command()
def transplant(
    model: Annotated[str, typer.Argument(help="the model folder or URI to give a new tokenizer")],
    donor: Annotated[str, typer.Argument(help="the model folder or URI whose tokenizer it gets")],
    output: Annotated[str, typer.Option(help="model folder or URI to write")],
    method: Annotated[
        str,
        typer.Option(help="rows of tokens the model lacks: omp | least_squares | subword"),
    ] = "omp",
    k: Annotated[int, typer.Option(help="omp: shared-token anchors per new token")] = 8,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Give MODEL the tokenizer of DONOR: rows of shared tokens copied, the others
    approximated from shared-token anchors (mergekit-tokensurgeon)."""
    # lazy: torch and tokenizers
    from amalgam.align.transplant import transplant as run_transplant

    done = run_transplant(
        model, donor, output, method=method, k=k, overwrite=overwrite, **_storage(storage_options)
    )
    console.print(
        f"[bold]transplanted[/] {model} -> {done.output} ({done.method}): {done.rows} rows, "
        f"{done.copied} copied, {done.approximated} approximated in {', '.join(done.tables)}",
        soft_wrap=True,
    )


@app.command()
def policy(
    name: Annotated[str, typer.Argument(help="registered model name")],
    gates: Annotated[
        Path | None,
        typer.Option(help="YAML of the gates (task_floor, max_negative_flip_rate, ...) to set"),
    ] = None,
    show: Annotated[bool, typer.Option("--show", help="print the policy in force")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Set (--gates) or print (--show) the registry's promotion policy for a model: the gates
    that decide every promotion of NAME, whatever a candidate's recipe says."""
    # lazy: pydantic and mlflow; `amalgam --help` stays fast
    from pydantic import ValidationError

    # lazy: the registry imports mlflow, which takes over a second
    from amalgam.config_file import load_yaml
    from amalgam.recipe import Gates
    from amalgam.registry import Registry

    if (gates is None) == (not show):
        raise AmalgamError("policy: give either --gates FILE (to set it) or --show")
    registry = Registry(tracking_uri)
    if gates is not None:
        try:
            wanted = Gates.model_validate(load_yaml(gates, "gates file") or {})
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise AmalgamError(f"{gates}: {bad}") from None
        found = registry.set_policy(
            name, wanted, source=f"operator (amalgam policy --gates {gates})"
        )
    else:
        found = registry.policy(name)
        if found is None:
            raise AmalgamError(f"{name}: no promotion policy in the registry")
    print(json.dumps({"name": name, **found.as_dict()}, indent=2))


@app.command()
def card(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="version number or alias")] = "champion",
    output: Annotated[
        str | None,
        typer.Option(help="model folder to write README.md into (default: the recorded output)"),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    storage_options: StorageOpt = None,
) -> None:
    """(Re)write the Hugging Face model card (README.md) of a registered version from what its
    run recorded, its gates checked against the registry's policy now."""
    # lazy: the registry imports mlflow, which takes over a second
    from amalgam.card import registered_card, write_card
    from amalgam.registry import Registry

    text, recorded = registered_card(Registry(tracking_uri), name, version)
    folder = output or recorded
    if folder is None:
        raise AmalgamError(f"{name}@{version}: its run records no output folder; give --output")
    print(write_card(folder, text, **_storage(storage_options)))


@app.command()
def batch(
    recipes: Annotated[
        list[Path],
        typer.Argument(help="recipe YAML files (each runs its whole pipeline)"),
    ],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster: ray://HOST:10001, auto (default: $RAY_ADDRESS, else local)"
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="recipes in flight at most")] = 4,
    retries: Annotated[
        int, typer.Option(help="runs after the first on worker death or storage errors")
    ] = 2,
    gpus_per_recipe: Annotated[
        float, typer.Option(help="GPUs each recipe's task asks Ray for (fractional: shared)")
    ] = 0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "amalgam-batch",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Run many recipes as Ray tasks on one Ray cluster; a summary table, logged to MLflow.
    Exit code 0 when every recipe merged or was already done, 1 when any failed (a file that
    does not parse is a failed recipe), 2 when a file is missing (nothing runs)."""
    missing = [str(p) for p in recipes if not p.is_file()]
    if missing:
        raise AmalgamError(f"{', '.join(missing)}: no such recipe file (nothing was run)")
    # lazy: the batch imports torch, Ray and MLflow; `amalgam --help` stays fast
    from amalgam.batch import run_batch

    result = run_batch(
        recipes,
        address=address,
        concurrency=concurrency,
        retries=retries,
        gpus=gpus_per_recipe,
        experiment=experiment,
        tracking_uri=tracking_uri,
    )
    table = Table("recipe", "status", "output", "content hash", "time", "read", "written", "error")
    for row in result.rows():
        table.add_row(
            row["recipe"],
            row["status"],
            row["output"],
            row["content_hash"].removeprefix("sha256:")[:12],
            f"{row['seconds']:.1f} s",
            _human(row["bytes_read"]),
            _human(row["bytes_written"]),
            row["error"],
        )
    console.print(table)
    totals = result.totals()
    console.print(
        f"{totals['ok']:.0f} ok, {totals['skipped']:.0f} skipped, {totals['failed']:.0f} failed "
        f"in {result.seconds:.1f} s; MLflow run {result.mlflow_run_id}",
        soft_wrap=True,
    )
    if result.exit_code:
        sys.exit(result.exit_code)


@app.command()
def soup(
    recipe: Annotated[
        Path, typer.Argument(help="linear recipe: the candidate models, evaluate.tasks_dir/tasks")
    ],
    split: Annotated[str, typer.Option(help="split the soup is chosen on")] = "validation",
    limit: Annotated[int | None, typer.Option(help="records per task")] = None,
    output_recipe: Annotated[
        Path | None, typer.Option(help="where the soup's recipe is written")
    ] = None,
    executor: Annotated[str, typer.Option(help="local | ray (scores the models alone)")] = "local",
    workers: Annotated[int, typer.Option(help="models scored at a time on Ray")] = 2,
    merge: Annotated[bool, typer.Option(help="run the soup's recipe through the pipeline")] = True,
) -> None:
    """Greedy soup (arXiv 2203.05482): models best first, each kept if the soup's score does not
    drop; writes the soup's recipe and merges it (evaluate/register as the recipe says)."""
    # lazy: torch
    from amalgam.recipe import load_recipe
    from amalgam.search.soup import run_soup

    if split not in ("validation", "test") or executor not in ("local", "ray"):
        raise AmalgamError(f"--split {split} / --executor {executor}: not a split / executor")
    parsed = load_recipe(recipe)
    target = output_recipe or recipe.with_name(recipe.stem + "-soup.yaml")
    result = run_soup(
        parsed,
        split=split,
        limit=limit,
        workers=workers,
        executor=executor,
        output=target,
        merge=merge,
    )
    table = Table("model", "alone", "soup with it", "kept", title=f"greedy soup ({split})")
    for step in result.steps:
        table.add_row(
            step.model,
            f"{step.individual:.4f}",
            f"{step.score:.4f}",
            "yes" if step.accepted else "no",
        )
    console.print(table)
    console.print(f"soup: {', '.join(result.ingredients)} ({result.score:.4f}); recipe {target}")
    if result.pipeline:
        print(json.dumps({k: result.pipeline[k] for k in ("output", "registered")}, default=str))


def main() -> None:
    """Entry point: bad input is one 'error:' line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except (AmalgamError, OSError) as exc:  # bad input, or the system refused (disk full)
        first, *rest = str(exc).splitlines() or [type(exc).__name__]
        print(
            "error: " + " ".join([first, "; ".join(r.strip() for r in rest)]).strip(),
            file=sys.stderr,
        )
        sys.exit(2)
    except Exception as exc:
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort | KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        raise


def entry() -> None:
    """The ``amalgam`` console script: :func:`main`, then, once it returned and no other thread
    runs, the exit handlers (log flushes, MLflow, Ray) and an immediate process exit. Python's
    own teardown of torch and the other loaded modules adds 0.5-1 s to every command and
    frees nothing the system does not reclaim anyway. Errors exit as :func:`main` does."""
    main()
    if threading.active_count() > 1:
        return  # a thread still runs: leave its joining to the interpreter
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    entry()
