"""The pipeline commands (run, nightly, sweep, search, promote, serve), each a Prefect flow,
added to the library's command line (:mod:`amalgam.cli`); ``main`` is the ``amalgam`` entry
point, ``entry`` its console script. This is the one module of the orchestration layer that calls
flows: the library never imports them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from amalgam.cli import app, console, entry, main
from amalgam.errors import AmalgamError

__all__ = ["app", "entry", "main"]


def _flows_env(one_line_errors: bool = True) -> None:
    """Prefect defaults for a command-line run: no telemetry, a patient ephemeral server, and
    its home folder (``$PREFECT_HOME``) created, which Prefect's server needs before it starts
    (it waits for its start-up timeout otherwise). ``one_line_errors`` imports Prefect now (see
    :func:`_one_line_errors`); ``serve`` sets its API URL first and passes False."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TQDM_DISABLE", "1")
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AmalgamError(f"PREFECT_HOME {home}: cannot create it ({exc.strerror})") from None
    if one_line_errors:
        _one_line_errors()


class _NoTraceback(logging.Filter):
    """Drops the traceback of an error that the command reports as its ``error:`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AmalgamError | OSError):
            record.exc_info, record.exc_text = None, None
        return True


def _one_line_errors() -> None:
    """Prefect's console shows a failed run's error without its traceback when ``main`` prints
    it as one ``error:`` line (the runs' logs in Prefect keep it)."""
    # lazy: Prefect's logging is configured when it is first imported
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if not any(isinstance(f, _NoTraceback) for f in handler.filters):
                handler.addFilter(_NoTraceback())


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
    from amalgam.recipe import load_recipe  # lazy: torch; `amalgam --help` stays fast

    parsed = load_recipe(recipe)  # bad input fails here, before Prefect starts
    from amalgam_flows.pipeline import merge_pipeline  # lazy: Prefect, for this command only

    # the flow's parameter is the file, read again inside the run: its storage options (keys)
    # never reach Prefect's database
    result = merge_pipeline(str(recipe.resolve()), output, executor, stage, overwrite)
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
    from amalgam.recipe import redact_uri  # lazy: torch
    from amalgam.registry import default_tracking_uri  # lazy: MLflow

    uri = redact_uri(tracking_uri) or default_tracking_uri()
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
    from amalgam.pipeline_config import load_nightly_config  # lazy: torch

    load_nightly_config(config)  # bad input fails here, before Prefect starts
    from amalgam_flows.nightly import nightly as nightly_flow  # lazy: Prefect

    # the flow's parameter is the file (read inside the run): no key reaches Prefect
    _print_result("nightly finished", nightly_flow(str(config.resolve())).as_dict())


@app.command()
def sweep(
    recipe: Annotated[Path, typer.Argument(help="base recipe YAML")],
    grid: Annotated[Path, typer.Option(help="grid YAML: methods and parameter values")],
    executor: Annotated[str, typer.Option(help="where candidates run: ray | local")] = "ray",
) -> None:
    """Merge and evaluate every grid point in parallel; log a leaderboard; register the best."""
    _flows_env()
    from amalgam.pipeline_config import load_grid  # lazy: torch
    from amalgam.recipe import load_recipe  # lazy: torch

    load_recipe(recipe), load_grid(grid)  # bad input fails here, before Prefect starts
    from amalgam_flows.sweep import run_sweep  # lazy: Prefect and Ray

    # the flow's parameters are the files (read inside the run): no key reaches Prefect
    result = run_sweep(str(recipe.resolve()), str(grid.resolve()), executor)
    _print_result("sweep finished", result.as_dict())


@app.command()
def search(
    spec: Annotated[Path, typer.Argument(help="search spec YAML (recipe, space, objective)")],
) -> None:
    """Evolutionary recipe search (CMA-ES): candidates merged and scored on Ray, every trial in
    MLflow, the best written as a recipe and registered; rerun to resume after a kill."""
    _flows_env()
    from amalgam.search.spec import load_search_spec, prepare  # lazy: torch

    prepare(load_search_spec(spec))  # bad input fails here, before Prefect starts
    from amalgam_flows.search import search as search_flow  # lazy: Prefect and Ray

    result = search_flow(str(spec.resolve()))
    _print_result("search finished", result.as_dict())


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="model version to promote to champion")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: SQLite under .amalgam)")
    ] = None,
) -> None:
    """Check the version against the registry's policy (amalgam policy NAME --show) and move
    the champion alias, or refuse naming the gate."""
    _flows_env()
    from amalgam.recipe import redact_uri  # lazy: torch
    from amalgam.registry import TRACKING_URI_ENV  # lazy: torch
    from amalgam_flows.promote import promote as promote_flow  # lazy: Prefect

    # the flow's parameter is the URI without its password (Prefect stores parameters); the
    # registry takes the password from this process's environment
    if tracking_uri is not None and redact_uri(tracking_uri) != tracking_uri:
        os.environ[TRACKING_URI_ENV] = tracking_uri
    _print_result("promoted", promote_flow(name, version, redact_uri(tracking_uri)))


@app.command()
def serve(
    config: Annotated[Path, typer.Option(help="nightly config YAML")] = Path(
        "configs/nightly.yaml"
    ),
    cron: Annotated[str, typer.Option(help="cron schedule of the nightly run")] = "0 2 * * *",
) -> None:
    """Serve the nightly flow on a cron schedule from this process (Ctrl-C stops it)."""
    _flows_env(one_line_errors=False)
    from amalgam.pipeline_config import load_nightly_config  # lazy: torch

    load_nightly_config(config)  # refuse a bad config before serving it every night
    from amalgam_flows.serve import serve_nightly  # lazy: Prefect

    serve_nightly(config, cron)


if __name__ == "__main__":
    entry()
