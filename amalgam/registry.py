"""MLflow tracking and registry for pipeline runs: lineage you can walk, gated promotion.

One MLflow run per pipeline run holds the recipe (flattened as params, and as
``recipe/recipe.yaml``), the parents' URIs and content hashes (tags ``amalgam.parent.<label>.uri``
and ``.hash``), the evaluation metrics, the report and plots (``report/``) and the merged model
(``model/``). A registered model version is created from that artifact location and gets the
alias ``candidate``; ``promote`` moves ``champion`` only when the gates pass.

Order and failures: a run is FINISHED only once everything is logged, and a version is created
only from a FINISHED run, so nothing is in the registry before everything it needs is. A failure
tags the run with its reason (``amalgam.failure``) before marking it FAILED, and rolls back a
version or registered model the call created. A store that cannot be reached or written
(read-only, deleted, a server down) raises :class:`StoreUnavailable` naming the store, its
password redacted; a SQLite store whose folder is gone is refused, not recreated empty.

Which gates: the registry's promotion policy for the model name, never the candidate's recipe.
The policy is a tag on the registered model (``amalgam.policy``, the gates as JSON, with
``amalgam.policy.source`` saying where it came from). An operator sets it (``set_policy``,
``amalgam policy NAME --gates FILE``); otherwise the registration that creates the model records
its recipe's gates as the policy, once. A later candidate's recipe gates change nothing: when
they differ from the policy, promotion says so and ignores them.

Concurrent promotions: ``promote`` holds an exclusive file lock per (tracking store, model name)
while it reads the champion, checks the gates and moves the alias, and it refuses a candidate
whose report was measured against another champion than the current one (compare-and-set on
the alias). Two runs evaluated against the same champion cannot both promote: the second sees
the champion moved. The lock is a local file lock (``$AMALGAM_HOME/mlflow/locks``): it covers
every process on one machine, or on hosts sharing that folder over a file system with working
``flock``; with a remote tracking server and several hosts, run promotions through one queue
(the promote flow under a concurrency limit of one).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import yaml

from amalgam import storage
from amalgam.errors import AmalgamError, RecipeError
from amalgam.evaluate.forgetting import ChampionStep
from amalgam.evaluate.report import EvalReport
from amalgam.evaluate.score import local_model
from amalgam.recipe import REDACTED, Gates, redact_uri, redact_uris
from amalgam.writer import process_alive

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from amalgam.recipe import Recipe

CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "amalgam."
PARENT_TAG = TAG + "parent."
CONTENT_TAG = TAG + "content_hash"  # on a run and its version: the model's content hash
COMPRESSED_TAG = TAG + "compressed."
PROMOTION_TAG = TAG + "promotion"
FAILURE_TAG = TAG + "failure"  # on a FAILED or KILLED run: why it failed
OWNER_TAG = TAG + "owner"  # on a run: host:pid of the process logging it
POLICY_TAG = TAG + "policy"  # on a registered model: the gates that decide its promotions
POLICY_SOURCE_TAG = POLICY_TAG + ".source"
EXPERTS_TAG = TAG + "expert_tasks"  # on a run: JSON list of the tasks whose experts it merged
SWEEP_TAG = TAG + "sweep"
BATCH_TAG = TAG + "batch"
SEARCH_TAG = TAG + "search"  # on a search run: its spec digest; on a trial: its index
RECIPE_ARTIFACT = "recipe/recipe.yaml"
REPORT_DIR = "report"
REPORT_ARTIFACT = f"{REPORT_DIR}/report.json"
HISTORY_ARTIFACT = f"{REPORT_DIR}/champion_history.json"
MODEL_DIR = "model"
MAX_TAG_CHARS = 5000
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_HELD = threading.local()  # lock files this thread holds
log = logging.getLogger(__name__)


class RegistryError(AmalgamError):
    """The tracking store refused an operation, or a run or version lacks what it needs."""


class StoreUnavailable(RegistryError):
    """The tracking store cannot be reached or written (read-only, deleted, server down)."""


# MLflow's error codes for a store that failed, as opposed to a request it refused
STORE_FAILURE_CODES = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR"}
TRACKING_URI_ENV = "AMALGAM_TRACKING_URI"


class PromotionRefused(RegistryError):
    """A gate failed; ``failures`` names each gate, task and values, ``gates`` the gate names."""

    def __init__(self, name: str, version: str, failures: list[str]):
        self.name, self.version, self.failures = name, version, failures
        self.gates = sorted({f.split(":", 1)[0] for f in failures})
        super().__init__(f"{name} version {version} not promoted:\n  " + "\n  ".join(failures))


@dataclass(frozen=True)
class Policy:
    """The gates that decide every promotion of a registered model, and where they came from
    (an operator, or the recipe of the registration that created the model)."""

    gates: Gates
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"gates": gates_record(self.gates), "source": self.source}

    @property
    def key(self) -> str:
        """The gates as canonical JSON: two policies with equal keys decide alike."""
        return json.dumps(gates_record(self.gates), sort_keys=True, separators=(",", ":"))


def gates_record(gates: Gates) -> dict[str, Any]:
    """The gates as stored in a policy: only the fields that are set, plus the floor metric."""
    return gates.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class Parent:
    uri: str
    hash: str


@dataclass
class Lineage:
    """A registered version traced back: its run, recipe, parents and metrics."""

    name: str
    version: str
    aliases: list[str]
    source: str
    run_id: str
    recipe: dict[str, Any]
    recipe_hash: str | None
    merged_uri: str | None
    parents: dict[str, Parent]
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def gates(self) -> Gates:
        """The gates recorded with the version's recipe (``register.gates``): what its author
        asked for. Promotion is decided by the registry's policy (:meth:`Registry.policy`)."""
        register = self.recipe.get("register")
        if not register:
            raise RecipeError(
                f"{self.name} version {self.version}: its recipe has no register section"
            )
        return Gates.model_validate(register.get("gates") or {})


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: str
    alias: str
    previous: str | None  # the version that held the alias before, if any


@dataclass(frozen=True)
class Promotion:
    """The last promotion outcome recorded on a run: ``promoted`` or ``refused``, why, and the
    policy that decided (:attr:`Policy.key`; None when there was none)."""

    outcome: str
    reason: str
    policy: str | None = None


@dataclass(frozen=True)
class Registered:
    """A registered version: name, version, its run, and whether this call created it."""

    name: str
    version: str
    run_id: str
    created: bool

    def as_dict(self) -> dict:
        return asdict(self)


def default_tracking_uri() -> str:
    """``sqlite:///$AMALGAM_HOME/mlflow/mlflow.db`` (the folder is created)."""
    folder = storage.amalgam_home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a SQLite store (None for any other store)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///"))
    return None


def sqlite_artifact_root(tracking_uri: str) -> str | None:
    """With a SQLite store, artifacts go next to its database file (MLflow's own default is
    ./mlruns under whatever folder the run started in); a server decides for itself."""
    db = sqlite_file(tracking_uri)
    return None if db is None else str(db.parent / "artifacts")


def resolve_tracking_uri(uri: str | None) -> str | None:
    """``uri``, or when its password is redacted (a flow parameter, a stored record), the same
    URI with its password from ``$AMALGAM_TRACKING_URI`` (where the command line puts it for
    its own process, or a deployment from a secret): credentials are never flow parameters."""
    if uri is None or f":{REDACTED}@" not in uri:
        return uri
    full = os.environ.get(TRACKING_URI_ENV)
    if full is None or redact_uri(full) != uri:
        raise RegistryError(
            f"tracking URI {uri}: its password is redacted; set {TRACKING_URI_ENV} to the URI "
            "with its password"
        )
    return full


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost error behind ``exc`` (passwords in URIs redacted)."""
    seen = 0
    while (inner := exc.__cause__ or exc.__context__) is not None and seen < 10:
        exc, seen = inner, seen + 1
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return redact_uri(text[:300]) or ""


def is_store_failure(exc: BaseException) -> bool:
    """True when ``exc`` says the store failed (unreachable, read-only, gone), not that it
    refused a request (no such model, name taken)."""
    # lazy: mlflow takes over a second to import
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in STORE_FAILURE_CODES
    return isinstance(exc, OSError) or type(exc).__module__.startswith("sqlalchemy")


class StoreClient:
    """An ``MlflowClient`` whose calls raise :class:`StoreUnavailable` naming the store (its
    URI, password redacted) when the store fails; a refused request raises as before."""

    def __init__(self, client: MlflowClient, store: str):
        self._client, self.store = client, store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, RegistryError) or not is_store_failure(exc):
                    raise
                raise StoreUnavailable(
                    f"MLflow store {self.store} failed ({name}: {_root_cause(exc)})"
                ) from exc

        return call


def _key(text: str) -> str:
    """A valid MLflow param, metric or tag key (other characters become '_')."""
    return _KEY_CHARS.sub("_", text)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists of mappings -> dotted keys; other lists as JSON."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
    elif value is not None:
        out[_key(prefix)] = value if isinstance(value, str) else json.dumps(value)
    return out


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as stored in the tracking store: storage options (credentials) left out,
    passwords in its URIs redacted."""
    return redact_uris(
        recipe.model_dump(mode="json", exclude={"storage_options"}, exclude_none=True)
    )


def lineage_tags(
    recipe: Recipe, parents: Mapping[str, tuple[str, str]], merged_uri: str | None = None
) -> dict[str, str]:
    """A run's lineage as tags: the recipe's hash and method, each parent's URI and content
    hash (by label), the merged model's URI."""
    return {
        TAG + "recipe_hash": recipe.hash(),
        TAG + "method": recipe.method,
        **{f"{PARENT_TAG}{_key(label)}.uri": uri for label, (uri, _) in parents.items()},
        **{f"{PARENT_TAG}{_key(label)}.hash": h for label, (_, h) in parents.items()},
        **({TAG + "merged_uri": merged_uri} if merged_uri else {}),
    }


def history_table(history: Sequence[ChampionStep], tasks: Sequence[str]) -> dict[str, list]:
    """The champion chain as a column table: version, absorbed tasks, score per task."""
    return {
        "version": [s.version for s in history],
        "absorbed": [", ".join(s.absorbed) for s in history],
        **{f"accuracy.{t}": [s.scores.get(t) for s in history] for t in tasks},
    }


def check_gates(report: EvalReport, gates: Gates) -> list[str]:
    """Every failed gate as 'gate: task value vs bound'; an empty list means the gates pass.

    ``task_floor`` (one floor for every task, or a floor per named task) bounds the
    ``floor_metric`` of each task from below; ``max_negative_flip_rate`` bounds each task's
    negative flip rate against the champion (passes when there is no champion yet);
    ``max_perplexity_ratio`` bounds PPL(candidate) / PPL(base); the forgetting gates are
    :func:`forgetting_failures`.
    """
    failures: list[str] = []
    if gates.task_floor is not None:
        floors = (
            dict(gates.task_floor)
            if isinstance(gates.task_floor, dict)
            else dict.fromkeys(report.tasks, gates.task_floor)
        )
        values = (
            report.normalized_accuracy
            if gates.floor_metric == "normalized_accuracy"
            else report.accuracy
        )
        for task, floor in floors.items():
            if task not in report.tasks:
                failures.append(f"task_floor: task {task} is not in the report")
            elif values.get(task) is None:
                failures.append(
                    f"task_floor: task {task} has no {gates.floor_metric} (no expert for it)"
                )
            elif values[task] < floor:
                failures.append(
                    f"task_floor: task {task} {gates.floor_metric} {values[task]:.4f} "
                    f"< floor {floor}"
                )
    bound = gates.max_negative_flip_rate
    if bound is not None and report.flips is not None:
        for task, flips in report.flips.items():
            if flips.negative_flip_rate > bound:
                failures.append(
                    f"max_negative_flip_rate: task {task} negative flip rate "
                    f"{flips.negative_flip_rate:.4f} > {bound} ({len(flips.negative)} of "
                    f"{flips.n} examples the champion got right)"
                )
    if gates.max_perplexity_ratio is not None:
        ratio = report.perplexity_ratio
        if ratio is None:
            failures.append("max_perplexity_ratio: the report has no perplexity ratio")
        elif ratio > gates.max_perplexity_ratio:
            failures.append(
                f"max_perplexity_ratio: perplexity ratio {ratio:.4f} > "
                f"{gates.max_perplexity_ratio} (candidate {report.perplexity:.4f}, "
                f"base {report.base_perplexity:.4f})"
            )
    return failures + forgetting_failures(report, gates)


def forgetting_failures(report: EvalReport, gates: Gates) -> list[str]:
    """The failed forgetting gates: ``max_forgetting`` bounds each task's forgetting against
    the champion chain, ``min_bwt`` the backward transfer; both pass while undefined (no
    earlier champion scored the task, no task absorbed before), and both fail on a report
    without forgetting figures (one not measured by a nightly run)."""
    wanted = [g for g in ("max_forgetting", "min_bwt") if getattr(gates, g) is not None]
    found = report.forgetting
    if found is None:
        return [
            f"{g}: the report has no forgetting figures (a nightly run measures them)"
            for g in wanted
        ]
    failures: list[str] = []
    if gates.max_forgetting is not None:
        bounds = (
            dict(gates.max_forgetting)
            if isinstance(gates.max_forgetting, dict)
            else dict.fromkeys(found.tasks, gates.max_forgetting)
        )
        for task, bound in bounds.items():
            f = found.tasks.get(task)
            if f is not None and f.forgetting > bound:
                failures.append(
                    f"max_forgetting: task {task} forgetting {f.forgetting:.4f} > {bound} "
                    f"(best {f.best:.4f} in champion version {f.best_version}, now {f.now:.4f})"
                )
    if gates.min_bwt is not None and found.bwt is not None and found.bwt < gates.min_bwt:
        over = ", ".join(f"{t} (absorbed in version {v})" for t, v in found.absorbed_at.items())
        failures.append(f"min_bwt: backward transfer {found.bwt:.4f} < {gates.min_bwt} over {over}")
    return failures


class Registry:
    """An MLflow tracking store and model registry (default: SQLite under $AMALGAM_HOME)."""

    def __init__(self, tracking_uri: str | None = None, *, artifact_root: str | None = None):
        # lazy: mlflow takes over a second to import
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # a tracking server that does not answer fails in seconds, not after MLflow's default
        # of 7 retries (about 4 minutes); set the variables to wait longer
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        # MLflow logs each database error with its traceback before raising it; the error is
        # raised to the caller as StoreUnavailable, so the log is left out
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.tracking_uri = resolve_tracking_uri(tracking_uri) or default_tracking_uri()
        self.store = redact_uri(self.tracking_uri) or ""  # as it may be shown or stored
        if self.store != self.tracking_uri:  # MLflow would print run links with the password
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        db = sqlite_file(self.tracking_uri)
        if db is not None and not db.parent.is_dir():
            # MLflow would create an empty store there: a deleted or unmounted store's runs
            # and versions would go on in a new one, cut off from their lineage
            raise StoreUnavailable(
                f"MLflow store {self.store}: its folder {db.parent} does not exist (a new "
                "SQLite store needs its folder created first)"
            )
        self.artifact_root = artifact_root or sqlite_artifact_root(self.tracking_uri)
        self.client: MlflowClient = StoreClient(  # type: ignore[assignment]
            MlflowClient(self.tracking_uri, self.tracking_uri), self.store
        )

    # -- runs -----------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        """The experiment called ``name``, created (artifacts under ``artifact_root``) if new."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.artifact_root:
            location = Path(self.artifact_root, name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_pipeline_run(
        self,
        recipe: Recipe,
        *,
        parents: Mapping[str, tuple[str, str]],
        merged_uri: str | None = None,
        report: EvalReport | None = None,
        artifacts: Sequence[str | Path] = (),
        tags: Mapping[str, str] | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        log_model: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> str:
        """Record one pipeline run; returns its run id.

        ``parents`` maps each input's label to (URI, content hash). The merged model folder is
        logged under ``model/`` when ``log_model`` (needed to register a version from the run).
        ``artifacts`` (report files, plots) go under ``report/``. ``storage_options`` reach a
        remote merged model (they are not recorded).
        """
        exp = experiment or (recipe.register.experiment if recipe.register else "amalgam")
        all_tags = {**lineage_tags(recipe, parents, merged_uri), **dict(tags or {})}
        all_tags = {k: redact_uri(str(v)) for k, v in all_tags.items()}
        if report is not None:
            all_tags[EXPERTS_TAG] = json.dumps(sorted(report.experts))
            if report.champion_version is not None:
                all_tags[TAG + "champion_version"] = report.champion_version
        experiment_id = self.experiment_id(exp)
        self.close_dead_runs(experiment_id)
        owner = {OWNER_TAG: f"{socket.gethostname()}:{os.getpid()}"}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=owner)
        run_id = run.info.run_id
        with self.finishing(run_id):
            self._log_recipe_run(run_id, recipe, all_tags, report.metrics() if report else {})
            if report is not None:
                self.client.log_text(run_id, report.model_dump_json(indent=1), REPORT_ARTIFACT)
                if report.forgetting is not None:
                    table = history_table(report.forgetting.history, report.tasks)
                    self.client.log_table(run_id, table, HISTORY_ARTIFACT)
            for path in artifacts:
                if report is None or Path(path).name != Path(REPORT_ARTIFACT).name:
                    self.client.log_artifact(run_id, str(path), REPORT_DIR)
            if log_model and merged_uri:
                with local_model(merged_uri, **dict(storage_options or {})) as folder:
                    self.client.log_artifacts(run_id, str(folder), MODEL_DIR)
        return run_id

    def close_dead_runs(self, experiment_id: str) -> None:
        """Mark KILLED, with the reason, the RUNNING runs whose logging process (of this host)
        is gone: a process killed while logging cannot close its run, so the next one does.
        Another host's runs are left alone (their owner cannot be checked from here)."""
        host = socket.gethostname()
        for run in self.client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
            owner_host, _, pid = run.data.tags.get(OWNER_TAG, "").rpartition(":")
            if owner_host == host and pid.isdigit() and not process_alive(int(pid)):
                reason = f"its process ({host}:{pid}) was killed while logging"
                with contextlib.suppress(Exception):
                    self.client.set_tag(run.info.run_id, FAILURE_TAG, reason)
                    self.client.set_terminated(run.info.run_id, "KILLED")

    @contextlib.contextmanager
    def finishing(self, run_id: str) -> Iterator[None]:
        """Run ``run_id`` ends FINISHED with the block, or FAILED with the reason when it
        raises (the error goes on)."""
        try:
            yield
        except BaseException as exc:
            self.fail_run(run_id, exc)
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def fail_run(self, run_id: str, exc: BaseException) -> None:
        """Mark ``run_id`` FAILED with the reason in its ``amalgam.failure`` tag, as far as the
        store lets it: the tag is written first, so no run is FAILED without a reason (a store
        that takes neither leaves the run as it was)."""
        reason = redact_uri(f"{type(exc).__name__}: {exc}")[:MAX_TAG_CHARS]
        with contextlib.suppress(Exception):
            self.client.set_tag(run_id, FAILURE_TAG, reason)
            self.client.set_terminated(run_id, "FAILED")

    def _log_recipe_run(
        self,
        run_id: str,
        recipe: Recipe,
        tags: Mapping[str, str],
        metrics: Mapping[str, float],
    ) -> None:
        """The recipe's params (flattened) and ``recipe.yaml``, ``tags`` and ``metrics``."""
        # lazy: mlflow takes over a second to import
        from mlflow.entities import Metric, Param, RunTag

        params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in flatten(recipe_record(recipe)).items()]
        run_tags = [RunTag(k, str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()]
        now = int(time.time() * 1000)
        run_metrics = [Metric(_key(k), v, now, 0) for k, v in metrics.items()]
        for i in range(0, max(len(params), len(run_tags), len(run_metrics)), 100):
            self.client.log_batch(
                run_id,
                metrics=run_metrics[i : i + 100],
                params=params[i : i + 100],
                tags=run_tags[i : i + 100],
            )
        self.client.log_text(run_id, yaml.safe_dump(recipe_record(recipe)), RECIPE_ARTIFACT)

    def register_merge(
        self,
        recipe: Recipe,
        *,
        model_name: str,
        content_hash: str,
        parents: Mapping[str, tuple[str, str]],
        merged_uri: str,
        report: EvalReport | None = None,
        artifacts: Sequence[str | Path] = (),
        compressed: Mapping[str, Any] | None = None,
        experiment: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Registered:
        """Log one pipeline run (see :meth:`log_pipeline_run`) tagged with the model's content
        hash (and ``compressed``'s summary) and register it as a ``candidate`` version."""
        tags = {CONTENT_TAG: content_hash}
        tags |= {f"{COMPRESSED_TAG}{k}": str(v) for k, v in (compressed or {}).items()}
        run_id = self.log_pipeline_run(
            recipe,
            parents=parents,
            merged_uri=merged_uri,
            report=report,
            artifacts=artifacts,
            tags=tags,
            experiment=experiment,
            storage_options=storage_options,
        )
        gates = recipe.register.gates if recipe.register else None
        try:  # nothing in the registry until the run holds everything it needs
            version = self.register_version(run_id, model_name, policy=gates)
        except BaseException as exc:
            self.fail_run(run_id, exc)
            raise
        return Registered(model_name, version, run_id, True)

    def log_leaderboard(
        self,
        experiment: str,
        rows: Sequence[Mapping[str, Any]],
        *,
        metric: str,
        grid: Mapping[str, Any],
    ) -> str:
        """One run for a sweep: the leaderboard (``rows``, best first) as ``leaderboard.json``,
        the ``grid`` (as ``grid.json``) and its hash, each row's metrics by rank, the best's
        name; returns the run id."""
        run = self.client.create_run(
            self.experiment_id(experiment),
            run_name="sweep",
            tags={SWEEP_TAG: "true", SWEEP_TAG + ".metric": metric},
        )
        run_id = run.info.run_id
        with self.finishing(run_id):
            table = {k: [r[k] for r in rows] for k in rows[0]}
            self.client.log_table(run_id, table, "leaderboard.json")
            self.client.log_text(run_id, json.dumps(grid, indent=1), "grid.json")
            for i, row in enumerate(rows):
                for key in ("mean_accuracy", "mean_normalized_accuracy", "perplexity_ratio"):
                    if row.get(key) is not None:
                        self.client.log_metric(run_id, key, row[key], step=i)
            self.client.log_param(run_id, "best", rows[0]["candidate"])
            compact = json.dumps(grid, separators=(",", ":"), ensure_ascii=False)
            grid_hash = hashlib.sha256(compact.encode()).hexdigest()[:16]
            self.client.log_param(run_id, "grid_hash", grid_hash)
        return run_id

    def log_batch(
        self,
        experiment: str,
        rows: Sequence[Mapping[str, Any]],
        *,
        totals: Mapping[str, float],
        items: Sequence[Mapping[str, Any]],
        recipes: Sequence[Recipe | None],
    ) -> str:
        """One run for a batch: the summary table (``rows``) as ``batch.json`` and ``totals``
        as metrics; under it a nested run per recipe (``items[i]``, the result of
        ``recipes[i]``, None where the file did not parse) with its lineage (recipe, parents'
        URIs and hashes, the merged URI and content hash), FAILED with its error when it
        failed. Returns the batch run's id."""
        experiment_id = self.experiment_id(experiment)
        run = self.client.create_run(experiment_id, run_name="batch", tags={BATCH_TAG: "true"})
        run_id = run.info.run_id
        with self.finishing(run_id):
            table = redact_uris({k: [r[k] for r in rows] for k in rows[0]} if rows else {})
            self.client.log_table(run_id, table, "batch.json")
            for key, value in totals.items():
                self.client.log_metric(run_id, key, float(value))
            for item, recipe in zip(items, recipes, strict=True):
                self._log_batch_item(experiment_id, run_id, item, recipe)
        return run_id

    def _log_batch_item(
        self, experiment_id: str, parent: str, item: Mapping[str, Any], recipe: Recipe | None
    ) -> None:
        tags = {
            "mlflow.parentRunId": parent,
            BATCH_TAG + ".recipe_file": item["recipe"],
            BATCH_TAG + ".status": item["status"],
        }
        if item["host"]:
            tags[BATCH_TAG + ".host"] = item["host"]
        if item["content_hash"]:
            tags[CONTENT_TAG] = item["content_hash"]
        if recipe is not None:
            tags |= lineage_tags(recipe, item["parents"], item["output"] or None)
        tags = redact_uris(tags)
        name = Path(item["recipe"]).name
        child = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        metrics = {k: float(item[k]) for k in ("seconds", "bytes_read", "bytes_written")}
        if recipe is not None:
            self._log_recipe_run(child, recipe, {}, metrics)
        else:
            for key, value in metrics.items():
                self.client.log_metric(child, key, value)
        if item["status"] == "failed":
            self.client.set_tag(child, FAILURE_TAG, item["error"][:MAX_TAG_CHARS])
            self.client.set_terminated(child, "FAILED")
        else:
            self.client.set_terminated(child, "FINISHED")

    # -- recipe searches ----------------------------------------------------------------------
    def start_search(self, experiment: str, digest: str, spec: Mapping[str, Any]) -> str:
        """The run a search's trials nest under (``spec`` as ``search.json``); left RUNNING
        until :meth:`finish_search`, so a resumed search goes on logging into it."""
        run = self.client.create_run(
            self.experiment_id(experiment), run_name="search", tags={SEARCH_TAG: digest}
        )
        self.client.log_text(run.info.run_id, json.dumps(spec, indent=1), "search.json")
        return run.info.run_id

    def log_search_trials(self, run_id: str, trials: Sequence[Mapping[str, Any]]) -> int:
        """One nested run per trial (``index``, ``generation``, ``values`` as params, ``scores``
        and ``objective`` as metrics) not logged yet (a resumed search may log a generation
        again); returns how many were new."""
        parent = self.client.get_run(run_id)
        logged = {
            r.data.tags.get(SEARCH_TAG + ".trial")
            for r in self.client.search_runs(
                [parent.info.experiment_id],
                f"tags.mlflow.parentRunId = '{run_id}'",
                max_results=50_000,  # MLflow's page limit; the default (1000) is a search's
            )
        }
        new = [t for t in trials if str(t["index"]) not in logged]
        for trial in new:
            tags = {
                "mlflow.parentRunId": run_id,
                SEARCH_TAG + ".trial": str(trial["index"]),
                SEARCH_TAG + ".generation": str(trial["generation"]),
                SEARCH_TAG + ".host": trial["host"],
            }
            child = self.client.create_run(
                parent.info.experiment_id, run_name=f"trial-{trial['index']}", tags=tags
            ).info.run_id
            metrics = {"objective": trial["objective"], "seconds": trial["seconds"]}
            metrics |= {f"accuracy.{k}": v for k, v in trial["scores"].items()}
            self._log_values(child, trial["values"], metrics)
            self.client.set_terminated(child, "FINISHED")
        return len(new)

    def finish_search(
        self, run_id: str, summary: Mapping[str, Any], metrics: Mapping[str, float]
    ) -> None:
        """The search's outcome (``summary`` as ``result.json``, ``metrics``); run FINISHED."""
        with self.finishing(run_id):
            self.client.log_text(run_id, json.dumps(summary, indent=1), "result.json")
            self._log_values(run_id, {}, metrics)

    def _log_values(
        self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]
    ) -> None:
        # lazy: mlflow takes over a second to import
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        run_metrics = [Metric(_key(k), float(v), now, 0) for k, v in metrics.items()]
        run_params = [Param(_key(k), str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, max(len(run_metrics), len(run_params)), 100):  # MLflow's batch limit
            self.client.log_batch(
                run_id, metrics=run_metrics[i : i + 100], params=run_params[i : i + 100]
            )

    # -- versions and aliases ---------------------------------------------------------------
    def register_version(
        self,
        run_id: str,
        model_name: str,
        artifact_path: str = MODEL_DIR,
        *,
        alias: str | None = CANDIDATE,
        policy: Gates | None = None,
    ) -> str:
        """Create a version of ``model_name`` from the run's ``artifact_path`` and point
        ``alias`` at it; returns the version. On any failure nothing registered remains.

        ``policy``: the recipe's gates, which become the model's promotion policy only when
        this call creates the registered model (first come); an existing model keeps its own."""
        # lazy: mlflow takes over a second to import
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(run_id)
        if not self.client.list_artifacts(run_id, artifact_path):
            raise RegistryError(f"run {run_id}: no artifacts under {artifact_path!r} to register")
        created_model = False
        tags = {}
        if policy is not None:
            source = f"recipe of run {run_id}, the registration that created {model_name}"
            tags = self._policy_tags(model_name, Policy(policy, source))
        try:
            self.client.create_registered_model(model_name, tags=tags)
            created_model = True
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"{model_name}: cannot create ({exc.message})") from None
        version = None
        lineage_tags = {
            k: v for k, v in run.data.tags.items() if k.startswith(TAG) and len(v) <= MAX_TAG_CHARS
        }
        try:
            mv = self.client.create_model_version(
                model_name,
                f"{run.info.artifact_uri}/{artifact_path}",
                run_id=run_id,
                tags=lineage_tags,
            )
            version = mv.version
            if alias:
                self.client.set_registered_model_alias(model_name, alias, version)
            self.client.set_tag(run_id, TAG + "registered", f"{model_name}/{version}")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if version is not None:
                    self.client.delete_model_version(model_name, version)
                if created_model:
                    self.client.delete_registered_model(model_name)
            if isinstance(exc, MlflowException):
                raise RegistryError(f"{model_name}: registration failed ({exc.message})") from None
            raise
        return str(version)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points at, or None (also when the model does not exist)."""
        # lazy: mlflow takes over a second to import
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def find_version(self, name: str, content_hash: str) -> Registered | None:
        """The first version of ``name`` whose model has ``content_hash``, if one exists."""
        from mlflow.exceptions import MlflowException  # lazy: mlflow takes 1.5 s to import

        try:
            found = self.client.search_model_versions(
                f"name = '{name}' and tags.`{CONTENT_TAG}` = '{content_hash}'"
            )
        except MlflowException:
            return None
        if not found:
            return None
        mv = min(found, key=lambda v: int(v.version))
        return Registered(name, str(mv.version), mv.run_id, created=False)

    def _version(self, name: str, version_or_alias: str | int) -> Any:
        # lazy: mlflow takes over a second to import
        from mlflow.exceptions import MlflowException

        ref = str(version_or_alias)
        try:
            if ref.isdigit():
                return self.client.get_model_version(name, ref)
            return self.client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            raise RegistryError(
                f"{name}@{ref}: no such model version in {self.store} ({exc.message})"
            ) from None

    def model_path(self, name: str, version_or_alias: str | int, dst: str | None = None) -> str:
        """A local folder holding the version's model files (downloaded if the store is
        remote; ``dst`` picks where)."""
        mv = self._version(name, version_or_alias)
        if mv.source.startswith("file://"):
            return unquote(urlparse(mv.source).path)
        # lazy: mlflow takes over a second to import
        from mlflow.artifacts import download_artifacts

        return download_artifacts(
            artifact_uri=mv.source, dst_path=dst, tracking_uri=self.tracking_uri
        )

    # -- lineage ----------------------------------------------------------------------------
    def run_text(self, run_id: str, path: str) -> str | None:
        """An artifact of a run as text, or None when the run has no such artifact."""
        # lazy: mlflow takes over a second to import
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="amalgam-mlflow-") as tmp:
            try:
                local = download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self.tracking_uri
                )
            except (MlflowException, OSError):
                return None
            return Path(local).read_text()

    def report(self, run_id: str) -> EvalReport | None:
        text = self.run_text(run_id, REPORT_ARTIFACT)
        return None if text is None else EvalReport.model_validate_json(text)

    def lineage(self, name: str, version_or_alias: str | int) -> Lineage:
        """From a version (or alias) to its run, recipe, parents' URIs and hashes, metrics."""
        mv = self._version(name, version_or_alias)
        if not mv.run_id:
            raise RegistryError(f"{name} version {mv.version}: not linked to a run")
        run = self.client.get_run(mv.run_id)
        tags = dict(run.data.tags)
        parents: dict[str, dict[str, str]] = {}
        for key, value in tags.items():
            if key.startswith(PARENT_TAG):
                label, _, kind = key[len(PARENT_TAG) :].rpartition(".")
                parents.setdefault(label, {})[kind] = value
        recipe_text = self.run_text(mv.run_id, RECIPE_ARTIFACT)
        return Lineage(
            name=name,
            version=str(mv.version),
            aliases=list(getattr(mv, "aliases", []) or []),
            source=mv.source,
            run_id=mv.run_id,
            recipe=yaml.safe_load(recipe_text) if recipe_text else {},
            recipe_hash=tags.get(TAG + "recipe_hash"),
            merged_uri=tags.get(TAG + "merged_uri"),
            parents={
                label: Parent(p.get("uri", ""), p.get("hash", "")) for label, p in parents.items()
            },
            metrics=dict(run.data.metrics),
            tags=tags,
        )

    def champion_history(self, name: str) -> list[ChampionStep]:
        """Every version of ``name`` promoted to champion (its run records the outcome
        ``promoted``), by version number: its ``accuracy.<task>`` metrics and the tasks whose
        experts it merged (:data:`EXPERTS_TAG`). Empty before the first promotion."""
        # lazy: mlflow takes over a second to import
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return []
        steps = []
        for mv in sorted(versions, key=lambda v: int(v.version)):
            run = self.client.get_run(mv.run_id)
            if run.data.tags.get(PROMOTION_TAG) != "promoted":
                continue
            scores = {
                k.removeprefix("accuracy."): v
                for k, v in run.data.metrics.items()
                if k.startswith("accuracy.")
            }
            absorbed = json.loads(run.data.tags.get(EXPERTS_TAG, "[]"))
            steps.append(ChampionStep(version=str(mv.version), scores=scores, absorbed=absorbed))
        return steps

    # -- promotion policy -------------------------------------------------------------------
    def policy(self, name: str) -> Policy | None:
        """The promotion policy recorded on the registered model ``name`` (None: none yet)."""
        # lazy: mlflow takes over a second to import
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(name).tags
        except MlflowException:
            return None
        if POLICY_TAG not in tags:
            return None
        try:
            gates = Gates.model_validate_json(tags[POLICY_TAG])
        except ValueError as exc:
            raise RegistryError(f"{name}: the registry policy is not valid gates ({exc})") from None
        return Policy(gates, tags.get(POLICY_SOURCE_TAG, "unknown"))

    def set_policy(self, name: str, gates: Gates, *, source: str = "operator") -> Policy:
        """Record ``gates`` as the promotion policy of ``name`` (the registered model is created
        when it does not exist yet), under the promotion lock; returns the policy."""
        # lazy: mlflow takes over a second to import
        from mlflow.exceptions import MlflowException

        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        policy = Policy(gates, f"{source}, {stamp}")
        tags = self._policy_tags(name, policy)
        with self.lock(name):
            try:
                self.client.create_registered_model(name, tags=tags)
                return policy
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise RegistryError(f"{name}: cannot create ({exc.message})") from None
            for key, value in tags.items():
                self.client.set_registered_model_tag(name, key, value)
        return policy

    @staticmethod
    def _policy_tags(name: str, policy: Policy) -> dict[str, str]:
        text = policy.key
        if len(text) > MAX_TAG_CHARS:
            raise RegistryError(f"{name}: the policy's gates take over {MAX_TAG_CHARS} characters")
        return {POLICY_TAG: text, POLICY_SOURCE_TAG: policy.source[:MAX_TAG_CHARS]}

    def _deciding_policy(self, name: str, champion: str | None) -> Policy | None:
        """The policy, or for a model registered before policies existed, the gates recorded
        with its champion's recipe (then recorded as its policy); None when neither exists."""
        policy = self.policy(name)
        if policy is not None or champion is None:
            return policy
        try:
            gates = self.lineage(name, champion).gates()
        except (RecipeError, ValueError):  # no register section, or gates that do not parse
            return None
        return self.set_policy(name, gates, source=f"recipe of champion version {champion}")

    def _ignored_gates(self, run_id: str, policy: Policy) -> str | None:
        """A note when the run's recipe asks for other gates than the policy (None: the same)."""
        text = self.run_text(run_id, RECIPE_ARTIFACT)
        register = (yaml.safe_load(text) or {}).get("register") if text else None
        if not register:
            return None
        try:
            asked = gates_record(Gates.model_validate(register.get("gates") or {}))
        except ValueError:  # recorded by another version of amalgam: shown as written
            asked = register.get("gates")
        if asked == gates_record(policy.gates):
            return None
        shown = json.dumps(asked, default=str)
        return f"the candidate recipe's gates {shown} were ignored: the policy decides"

    # -- promotion --------------------------------------------------------------------------
    def promotion(self, run_id: str) -> Promotion | None:
        """The promotion outcome last recorded on ``run_id`` (None: never tried)."""
        tags = self.client.get_run(run_id).data.tags
        if PROMOTION_TAG not in tags:
            return None
        policy = tags.get(PROMOTION_TAG + ".policy", "none")
        return Promotion(
            tags[PROMOTION_TAG],
            tags.get(PROMOTION_TAG + ".reason", ""),
            None if policy == "none" else policy,
        )

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float = 120.0) -> Iterator[None]:
        """An exclusive lock on promotions of ``name`` in this tracking store, across
        processes and threads; a thread that holds it may enter it again (``promote`` inside
        a caller's ``lock`` does not deadlock)."""
        key = hashlib.sha256(f"{self.tracking_uri}\0{name}".encode()).hexdigest()[:24]
        path = storage.amalgam_home() / "mlflow" / "locks" / f"{key}.lock"
        held: set[str] = _HELD.__dict__.setdefault("paths", set())
        if str(path) in held:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        with path.open("a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RegistryError(
                            f"{name}: another promotion holds {path} for over {timeout:.0f} s"
                        ) from None
                    time.sleep(0.05)
            held.add(str(path))
            try:
                yield
            finally:
                held.discard(str(path))
                fcntl.flock(fh, fcntl.LOCK_UN)

    def promote(
        self,
        name: str,
        version: str | int,
        *,
        report: EvalReport | None = None,
        alias: str = CHAMPION,
    ) -> PromotionResult:
        """Move ``alias`` to ``version`` (a number or an alias) if its report passes the gates
        of the registry's policy for ``name`` (:meth:`policy`; never the candidate recipe's
        own) and was measured against the current champion; otherwise raise
        :class:`PromotionRefused`. Either way the outcome and reason are recorded as tags on the
        version's run. Without a policy nothing is promoted."""
        with self.lock(name):
            mv = self._version(name, version)
            version = str(mv.version)
            current = self.alias_version(name, alias)
            if current == version:
                return PromotionResult(name, version, alias, current)
            policy = self._deciding_policy(name, current)
            report = report or self.report(mv.run_id)
            failures: list[str] = []
            if policy is None:
                failures.append(
                    f"policy: {name} has no promotion policy in the registry; an operator sets "
                    f"one with `amalgam policy {name} --gates FILE`"
                )
            if report is None:
                failures.append(f"report: run {mv.run_id} has no {REPORT_ARTIFACT}")
            elif report.champion_version != current:
                failures.append(
                    f"champion: the report compares against champion "
                    f"{report.champion_version or 'none'}, but {alias} is now "
                    f"{current or 'none'}; evaluate again against it"
                )
            if report is not None and policy is not None:
                failures += [f"{f} (registry policy)" for f in check_gates(report, policy.gates)]
            note = self._ignored_gates(mv.run_id, policy) if policy is not None else None
            if note:
                log.warning("%s version %s: %s", name, version, note)
            if failures:
                reason = "; ".join(failures + ([note] if note else []))
                self._record(mv.run_id, "refused", reason, policy)
                raise PromotionRefused(name, version, failures)
            self.set_alias(name, alias, version)
            reason = f"{alias} {current or 'none'} -> {version}" + (f"; {note}" if note else "")
            self._record(mv.run_id, "promoted", reason, policy)
        return PromotionResult(name, version, alias, current)

    def _record(self, run_id: str, outcome: str, reason: str, policy: Policy | None) -> None:
        self.client.set_tag(run_id, PROMOTION_TAG, outcome)
        self.client.set_tag(run_id, PROMOTION_TAG + ".reason", reason[:MAX_TAG_CHARS])
        self.client.set_tag(run_id, PROMOTION_TAG + ".policy", policy.key if policy else "none")
