"""The amalgam command line (typer): inspect, merge, methods, stats, zoo, evaluate, compress,
and the pipeline commands run, nightly, sweep, promote, serve (Prefect flows, imported when
called)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from amalgam.errors import AmalgamError

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
        int | None, typer.Option(help="compute threads (default: all cores but one)")
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
) -> None:
    """Merge the models of a recipe into a Hugging Face model folder."""
    from pydantic import ValidationError
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    from amalgam.engine import MergeOptions, run_merge
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
        )
    except ValidationError as exc:
        bad = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise AmalgamError(bad) from None
    if plan_only:
        from amalgam.engine import plan_recipe

        console.print(plan_recipe(recipe, options).describe())
        return
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

        result = run_merge(recipe, options, progress)
    plan = result.plan
    console.print(
        f"[bold]merged[/] {len(plan.labels)} inputs with {recipe.method} -> {result.output}\n"
        f"{len(plan.jobs)} tensors in {len(plan.units)} shard(s), "
        f"{_human(plan.output_bytes)} written, {_human(result.input_bytes)} read in "
        f"{result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s), "
        f"peak RSS {_human(result.peak_rss_bytes)}",
        soft_wrap=True,
    )


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from amalgam.merge import REGISTRY

    table = Table("method", "parameters (default)", "what it does", "paper")
    for name in sorted(REGISTRY):
        m = REGISTRY[name]
        params = ", ".join(f"{p.name}{'*' if p.per_model else ''}={p.default}" for p in m.params)
        table.add_row(name, params, m.summary, m.paper)
    console.print(table)
    console.print("* settable per model; numeric values may be lists (layer gradients)")


@app.command()
def stats(
    model: Annotated[str, typer.Argument(help="local Hugging Face model folder")],
    data: Annotated[str, typer.Option(help="task folder (validation split) or jsonl file")],
    kind: Annotated[str, typer.Option(help="fisher | gram")],
    output: Annotated[
        str | None, typer.Option(help="artifact URI (default: the cache under $AMALGAM_HOME)")
    ] = None,
    samples: Annotated[int, typer.Option(help="examples of the data to use")] = 256,
    fisher: Annotated[str, typer.Option(help="sampled | empirical (Fisher targets)")] = "sampled",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    storage_options: StorageOpt = None,
) -> None:
    """Compute a model's Fisher diagonals or linear-layer input Grams on data (cached)."""
    import time

    from amalgam.statistics import cached_statistics, compute_statistics
    from amalgam.statistics.compute import settings_for

    settings = settings_for(kind, samples, fisher)
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
) -> None:
    """Build (or reuse) the benchmark zoo: base, experts, LoRA adapters, MoE, tasks; prints
    its folder on stdout (progress goes to stderr)."""
    from amalgam.zoo.build import build_zoo

    progress = Console(stderr=True)  # stdout carries only the zoo folder, for scripts
    zoo = build_zoo(out, profile=profile, force=force, log=lambda m: progress.print(m))
    progress.print(f"zoo ready at {zoo.root}")
    print(zoo.root)


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Argument(help="model folder(s) to evaluate")],
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(help="lm-eval task folder")] = None,
    limit: Annotated[int | None, typer.Option(help="examples per task")] = None,
    split: Annotated[str, typer.Option(help="test | validation")] = "test",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Run lm-eval offline on model folders; print per-task accuracy."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request progress bars
    from amalgam.evaluate.harness import evaluate_model
    from amalgam.evaluate.table import render_table

    if tasks_dir is None:
        from amalgam.zoo.build import build_zoo

        tasks_dir = build_zoo(log=lambda m: None).tasks_dir
    names = tasks.split(",") if tasks else None
    rows = {}
    for m in model:
        rows[Path(m).name] = evaluate_model(
            m, tasks_dir, names, limit=limit, device=device, split=split
        )
    task_names = names or sorted({t for r in rows.values() for t in r})
    Console(width=max(console.width, 120)).print(render_table(rows, task_names))


def _flows_env() -> None:
    """Prefect defaults for a command-line run: no telemetry, a patient ephemeral server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _print_result(title: str, result: dict) -> None:
    console.print(f"[bold]{title}[/]")
    print(json.dumps(result, indent=2, default=str))


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML (with evaluate/register sections)")],
    output: Annotated[str | None, typer.Option(help="output folder or URI")] = None,
    executor: Annotated[str | None, typer.Option(help="local | ray")] = None,
    stage: Annotated[bool, typer.Option(help="copy every input to the local cache first")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an output from another recipe")] = False,
) -> None:
    """Run the whole pipeline (fetch, align, merge, compress, evaluate, register) as a flow."""
    _flows_env()
    from amalgam.recipe import load_recipe

    parsed = load_recipe(recipe)  # bad input fails here, before Prefect starts
    from flows.pipeline import merge_pipeline

    result = merge_pipeline(parsed, output, executor, stage, overwrite)
    summary = {k: v for k, v in result.as_dict().items() if k not in ("inputs", "report")}
    _print_result("pipeline finished", summary)
    if result.report:
        _print_report(result.report)
    if result.registered:
        _print_where_to_look(parsed.register.tracking_uri, result.registered)


def _print_report(metrics: dict[str, float]) -> None:
    tasks = sorted(k.split(".", 1)[1] for k in metrics if k.startswith("accuracy."))
    table = Table("task", "accuracy", "normalized accuracy", title="candidate")
    for t in tasks:
        norm = metrics.get(f"normalized_accuracy.{t}")
        table.add_row(t, f"{metrics[f'accuracy.{t}']:.3f}", "-" if norm is None else f"{norm:.3f}")
    mean_norm = metrics.get("mean_normalized_accuracy")
    table.add_row(
        "mean",
        f"{metrics['mean_accuracy']:.3f}",
        "-" if mean_norm is None else f"{mean_norm:.3f}",
    )
    console.print(table)


def _print_where_to_look(tracking_uri: str | None, registered: dict) -> None:
    from amalgam.registry import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    prefect_home = os.environ.get("PREFECT_HOME", "~/.prefect")
    console.print(
        f"[bold]registered[/] {registered['name']} version {registered['version']} "
        f"(alias candidate; promote with `amalgam promote {registered['name']} "
        f"{registered['version']}`)\n"
        f"MLflow (runs, metrics, lineage, model):  mlflow ui --backend-store-uri {uri}\n"
        f"Prefect (flow runs, task runs, artifacts):  PREFECT_HOME={prefect_home} "
        "prefect server start",
        soft_wrap=True,
    )


@app.command()
def nightly(
    config: Annotated[Path, typer.Argument(help="nightly config YAML")],
) -> None:
    """Absorb new expert checkpoints into the champion; promote only if every gate passes."""
    _flows_env()
    from amalgam.pipeline_config import load_nightly_config

    parsed = load_nightly_config(config)
    from flows.nightly import nightly as nightly_flow

    _print_result("nightly finished", nightly_flow(parsed).as_dict())


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="base recipe YAML")],
    grid: Annotated[Path, typer.Option(help="grid YAML: methods and parameter values")],
    executor: Annotated[str, typer.Option(help="where candidates run: ray | local")] = "ray",
) -> None:
    """Merge and evaluate every grid point in parallel; log a leaderboard; register the best."""
    _flows_env()
    from amalgam.pipeline_config import load_grid
    from amalgam.recipe import load_recipe

    parsed, grid_spec = load_recipe(recipe), load_grid(grid)
    from flows.sweep import run_sweep

    _print_result("sweep finished", run_sweep(parsed, grid_spec, executor).as_dict())


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="model version to promote to champion")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: SQLite under .amalgam)")
    ] = None,
) -> None:
    """Check the version's gates and move the champion alias, or refuse naming the gate."""
    _flows_env()
    from flows.promote import promote as promote_flow

    _print_result("promoted", promote_flow(name, version, tracking_uri))


@app.command()
def serve(
    config: Annotated[Path, typer.Option(help="nightly config YAML")] = Path(
        "configs/nightly.yaml"
    ),
    cron: Annotated[str, typer.Option(help="cron schedule of the nightly run")] = "0 2 * * *",
) -> None:
    """Serve the nightly flow on a cron schedule from this process (Ctrl-C stops it)."""
    _flows_env()
    from amalgam.pipeline_config import load_nightly_config

    load_nightly_config(config)  # refuse a bad config before serving it every night
    from flows.serve import serve_nightly

    serve_nightly(config, cron)


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="fine-tuned model folder or URI")],
    base: Annotated[str, typer.Option(help="the base it was fine-tuned from")],
    output: Annotated[str, typer.Option(help="compressed model folder or URI")],
    density: Annotated[float, typer.Option(help="share of each task vector kept")] = 0.1,
    scale: Annotated[str, typer.Option(help="mean | std (ComPEFT's alpha * std)")] = "mean",
    alpha: Annotated[float, typer.Option(help="multiplier of the scale")] = 1.0,
    keep_dense: Annotated[
        str | None, typer.Option(help="regex of tensors stored uncompressed")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Compress a fine-tune against its base (ComPEFT: top-k task vector as sign x scale)."""
    from pydantic import ValidationError

    from amalgam.compress import compress_model
    from amalgam.recipe import CompressSpec

    try:
        spec = CompressSpec(density=density, scale=scale, alpha=alpha, keep_dense=keep_dense)
    except ValidationError as exc:
        bad = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())
        raise AmalgamError(bad) from None
    result = compress_model(
        model, base, output, spec, overwrite=overwrite, **_storage(storage_options)
    )
    summary = result.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(
        f"[bold]compressed[/] {model} -> {result.output}\n"
        f"{summary['kept']:,} of {summary['parameters']:,} entries kept; "
        f"{_human(result.dense_bytes)} -> {result.compressed_bytes:,} bytes "
        f"({result.ratio:.1f}x smaller; config and tokenizer files: {result.side_bytes:,} bytes)",
        soft_wrap=True,
    )


@app.command()
def decompress(
    compressed: Annotated[str, typer.Argument(help="compressed model folder or URI")],
    output: Annotated[str, typer.Option(help="dense model folder or URI")],
    base: Annotated[
        str | None, typer.Option(help="the base (default: the one recorded at compression)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    storage_options: StorageOpt = None,
) -> None:
    """Rebuild a dense Hugging Face model folder from a compressed model and its base."""
    from amalgam.compress import decompress_model

    out = decompress_model(
        compressed, base, output, overwrite=overwrite, **_storage(storage_options)
    )
    console.print(f"[bold]decompressed[/] {compressed} -> {out}", soft_wrap=True)


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
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort | KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
