"""Real processes killed with SIGKILL at a named point (``killpoint/sitecustomize.py``), and
what the tests check afterwards: an output is complete or absent, weight files by sha256,
work folders a killed run leaves."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from amalgam import storage
from amalgam.discover import discover_checkpoints
from amalgam.writer import INDEX_NAME, intact, read_record

KILLPOINT = Path(__file__).resolve().parent / "killpoint"
REPO = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL

#: ``amalgam run`` without Prefect: the library's pipeline, ``overwrite`` as the 2nd argument.
PIPELINE = (
    "import sys\n"
    "from amalgam.engine import MergeOptions\n"
    "from amalgam.pipeline import run_pipeline\n"
    "run_pipeline(sys.argv[1], MergeOptions(overwrite=sys.argv[2] == 'overwrite'))\n"
)

EXPERTS = ["zoo_mulmod", "zoo_compare"]
SHARD = 200_000  # three shards of the tiny zoo's merge: several files to write and copy

#: Names of work folders a run leaves only when it dies: commit staging, a continual merge's
#: steps, an output renamed aside (``.old``).
WORK_FOLDER = re.compile(r"^\..+\.(partial|steps)-|\.old$")


@dataclass
class Done:
    code: int
    out: str
    err: str

    @property
    def tail(self) -> str:
        return (self.out[-2000:] + "\n" + self.err[-3000:]).strip()


@dataclass
class Place:
    """Where a test's outputs go: a local folder or an S3 prefix, and the options to reach it."""

    root: str
    options: dict[str, Any]

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"


def recipe(zoo, place: Place, lam: float = 0.5, full: bool = False) -> dict:
    """Task arithmetic of two tiny-zoo experts into ``place``; ``full``: with compress,
    evaluate and register sections. Nothing in it names a place but the output (which the
    recipe's hash leaves out): every run writes the same bytes, wherever it writes them.
    The compressed model goes next to the merge, the registry under ``$AMALGAM_HOME``."""
    body: dict[str, Any] = {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[e])} for e in EXPERTS],
        "params": {"lambda": lam},
        "dtype": "float32",
        "output": place.uri("merged"),
        "max_shard_size": SHARD,
    }
    if place.options:
        body["storage_options"] = place.options
    if full:
        body["compress"] = {"density": 0.5, "max_shard_size": SHARD}
        body["evaluate"] = {
            "tasks_dir": str(zoo.tasks_dir),
            "tasks": EXPERTS,
            "limit": 8,
            "engine": "quick",
            "device": "cpu",
            "perplexity": False,
        }
        body["register"] = {"model_name": "kills"}
    return body


def write_recipe(folder: Path, body: dict) -> Path:
    path = folder / f"recipe-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def killpoint_pythonpath() -> str:
    """``PYTHONPATH`` for a process that loads the fault-injection ``sitecustomize`` (kill and
    pause points) and this repository."""
    path = [str(KILLPOINT), str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in path if p)


def process_env(home: Path, kill: str | None = None, once: Path | None = None) -> dict[str, str]:
    """The environment of a run: its own ``$AMALGAM_HOME`` and Prefect home, the kill point
    (``module:Qual.name:N[:after]``) when one is named."""
    env = {
        **os.environ,
        "PYTHONPATH": killpoint_pythonpath(),
        "AMALGAM_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TQDM_DISABLE": "1",
    }
    for name in ("AMALGAM_TEST_KILL", "AMALGAM_TEST_KILL_ONCE"):
        env.pop(name, None)
    if kill:
        env["AMALGAM_TEST_KILL"] = kill
    if once:
        env["AMALGAM_TEST_KILL_ONCE"] = str(once)
    return env


def run_process(args: list[str], env: dict[str, str], timeout: float = 300) -> Done:
    """Run ``python ARGS`` in a session of its own; whatever it started and left behind (the
    ephemeral Prefect server of a killed ``amalgam run``) is killed once it has exited. Its
    output goes through files: a child left behind would keep pipes open."""
    home = Path(env["AMALGAM_HOME"])
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            cwd=home,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        return Done(proc.returncode, out.read(), err.read())


def pipeline(recipe: Path, env: dict[str, str], overwrite: bool = False) -> Done:
    """The pipeline of ``recipe`` in a process of its own."""
    return run_process(["-c", PIPELINE, str(recipe), "overwrite" if overwrite else "-"], env)


def rerun(recipe: Path, home: Path, monkeypatch: Any, overwrite: bool = False) -> Any:
    """The same pipeline again, in this process (the library call the process above makes;
    the imports are paid once per test session)."""
    # lazy: the pipeline imports torch, transformers and MLflow
    from amalgam.engine import MergeOptions
    from amalgam.pipeline import run_pipeline

    monkeypatch.setenv("AMALGAM_HOME", str(home))
    return run_pipeline(recipe, MergeOptions(overwrite=overwrite))


def weights(uri: str, **storage_options: Any) -> dict[str, str]:
    """sha256 of every weight file (shards and index) of the output folder at ``uri``."""
    fs, path = storage.resolve(uri, **storage_options)
    fs.invalidate_cache(path)
    found = {}
    for file in fs.ls(path, detail=False):
        name = PurePosixPath(file).name
        if name.endswith(".safetensors") or name == INDEX_NAME:
            found[name] = hashlib.sha256(fs.cat_file(file)).hexdigest()
    return found


def left_at(uri: str, **storage_options: Any) -> tuple[str, list[str]]:
    """What a killed run left at ``uri``: ``absent``, ``complete`` (its commit record and every
    file as recorded) or, on an object store where files are copied one by one,
    ``unfinished`` (files without a commit record: what no reader may take for a model).
    Fails on anything else. Also the folders of its parent that ``discover`` lists although
    they are not complete (none, once readers require the commit record)."""
    fs, path = storage.resolve(uri, **storage_options)
    fs.invalidate_cache()
    parent = storage.full_uri(fs, str(PurePosixPath(path).parent))
    listed = [
        found
        for _, found in discover_checkpoints(parent, **storage_options)
        if not intact(*storage.resolve(found, **storage_options))
    ]
    if not fs.exists(path):
        return "absent", listed
    if intact(fs, path):
        return "complete", listed
    assert not storage.is_local(fs), f"{uri}: a local output that is not complete"
    assert read_record(fs, path) is None, f"{uri}: a commit record, but not complete"
    return "unfinished", listed


def work_folders(uri: str, **storage_options: Any) -> list[str]:
    """Hidden work folders (staging, steps, ``.old``) anywhere under ``uri``."""
    fs, root = storage.resolve(uri, **storage_options)
    fs.invalidate_cache()
    if not fs.exists(root):
        return []
    paths = fs.find(root, withdirs=True)
    names = {PurePosixPath(p.rstrip("/")).relative_to(root) for p in paths}
    return sorted(str(n) for n in names if any(WORK_FOLDER.search(part) for part in n.parts))
