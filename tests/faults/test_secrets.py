"""Secrets are never persisted: ``amalgam run``, ``nightly`` and ``sweep`` on a real S3 server
whose secret key is a random token, written into the recipe and config files. After the
commands, no file that the pipeline wrote (Prefect's database, WAL and result storage, MLflow's
database and artifacts, ``$AMALGAM_HOME``, the outputs on disk and in the bucket) and none of
the commands' output holds the token, in plain text, base64 or hex. The same for a password in
URIs: ``amalgam run`` with a model on a real HTTP server and a real ``mlflow server``, both
addressed as ``http://user:password@...``, then ``amalgam promote --tracking-uri`` with it."""

from __future__ import annotations

import base64
import json
import pickle
import secrets
import sqlite3
from pathlib import Path

import pytest
import yaml
from httpserver import http_folder
from mlflowserver import start_mlflow_server
from s3server import free_ports
from zoo.conftest import zoo_tiny

from amalgam.errors import RecipeError
from amalgam.pipeline_config import Grid, NightlyConfig, load_nightly_config
from amalgam.recipe import REDACTED, parse_recipe, redact_uri
from amalgam.registry import (
    TRACKING_URI_ENV,
    Registry,
    RegistryError,
    recipe_record,
    resolve_tracking_uri,
)
from amalgam.sweep import point_recipe
from tests.faults.cli import amalgam_process, printed_result

__all__ = ["zoo_tiny"]

TASKS = ["zoo_mulmod", "zoo_compare"]
EXPERTS = ["zoo_compare", "zoo_mulmod"]


PLANTED = "planted-7c1f0e9a4b2d4e6f8a3c5b7d9e1f2a4c"
OPTIONS = {"key": "k", "secret": PLANTED, "client_kwargs": {"endpoint_url": "http://x"}}


def small_recipe(**extra) -> dict:
    return {"method": "linear", "models": [{"uri": "a"}, {"uri": "b"}], **extra}


def test_a_recipe_keeps_its_storage_options_in_memory_and_never_in_json_or_repr() -> None:
    recipe = parse_recipe(small_recipe(storage_options=OPTIONS))
    assert recipe.storage_options == OPTIONS
    assert pickle.loads(pickle.dumps(recipe)).storage_options == OPTIONS  # Ray workers
    assert recipe.model_dump()["storage_options"] == OPTIONS
    dumped = recipe.model_dump(mode="json")["storage_options"]
    assert dumped == {"key": REDACTED, "secret": REDACTED, "client_kwargs": REDACTED}
    for text in (recipe.model_dump_json(), repr(recipe), str(recipe)):
        assert PLANTED not in text
    # a sweep point is built from the recipe and keeps its options
    grid = Grid.model_validate({"methods": {"linear": {}}})
    assert point_recipe(recipe, grid.points()[0]).storage_options == OPTIONS


def test_a_stored_redacted_copy_is_refused_when_run() -> None:
    recipe = parse_recipe(small_recipe(storage_options=OPTIONS))
    with pytest.raises(RecipeError, match="redacted"):
        parse_recipe(recipe.model_dump(mode="json"))


def test_a_password_in_the_tracking_uri_is_redacted() -> None:
    uri = f"postgresql://amalgam:{PLANTED}@db.internal:5432/mlflow"
    recipe = parse_recipe(small_recipe(register={"tracking_uri": uri, "model_name": "m"}))
    assert recipe.register.tracking_uri == uri
    stored = recipe.model_dump(mode="json")["register"]["tracking_uri"]
    assert stored == f"postgresql://amalgam:{REDACTED}@db.internal:5432/mlflow"
    assert PLANTED not in repr(recipe)
    assert PLANTED not in json.dumps(recipe_record(recipe))  # MLflow's recipe.yaml
    with pytest.raises(RecipeError, match="redacted"):
        parse_recipe(recipe.model_dump(mode="json"))
    assert redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"
    assert redact_uri("http://user@host/x") == "http://user@host/x"
    signed = "https://h/m/model.safetensors?v=2&X-Amz-Signature={}&sig={}"
    assert redact_uri(signed.format(PLANTED, PLANTED)) == signed.format(REDACTED, REDACTED)


def test_a_model_uri_password_is_redacted_in_the_registry_record(monkeypatch) -> None:
    model = f"https://amalgam:{PLANTED}@models.internal/expert"
    recipe = parse_recipe(small_recipe(models=[{"uri": model}, {"uri": "b"}]))
    assert recipe.models[0].uri == model  # the run reads it whole
    assert PLANTED not in json.dumps(recipe_record(recipe))
    assert recipe_record(recipe)["models"][0]["uri"] == redact_uri(model)


def test_a_redacted_tracking_uri_takes_its_password_from_the_environment(monkeypatch) -> None:
    full = f"http://amalgam:{PLANTED}@127.0.0.1:5000"
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    with pytest.raises(RegistryError, match=TRACKING_URI_ENV):
        resolve_tracking_uri(redact_uri(full))
    monkeypatch.setenv(TRACKING_URI_ENV, full)
    assert resolve_tracking_uri(redact_uri(full)) == full
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    other = f"http://amalgam:{REDACTED}@10.0.0.1:5000"  # another server: never its password
    with pytest.raises(RegistryError, match="redacted"):
        resolve_tracking_uri(other)


def test_a_nightly_config_hides_both_its_storage_options(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEAK_TEST_SECRET", PLANTED)
    raw = {
        "experts": "s3://bucket/experts",
        "storage_options": {"secret": "${LEAK_TEST_SECRET}"},
        "recipe": {
            "method": "continual_ta",
            "base": "s3://bucket/base",
            "storage_options": {"secret": "${LEAK_TEST_SECRET}"},
            "evaluate": {"tasks_dir": "tasks"},
            "register": {"model_name": "m"},
        },
    }
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(raw))
    config = load_nightly_config(tmp_path / "nightly.yaml")  # ${VAR} expanded when read
    assert config.expert_options == {"secret": PLANTED}
    assert config.template.storage_options == {"secret": PLANTED}
    assert isinstance(config, NightlyConfig)
    for text in (config.model_dump_json(), repr(config)):
        assert PLANTED not in text


def test_prefect_stores_flow_parameters_redacted() -> None:
    from amalgam_flows.nightly import nightly
    from amalgam_flows.pipeline import merge_pipeline
    from amalgam_flows.sweep import sweep

    recipe = parse_recipe(small_recipe(storage_options=OPTIONS))
    config = NightlyConfig(experts="s3://b/e", recipe={"storage_options": OPTIONS})
    grid = Grid.model_validate({"methods": {"linear": {}}})
    stored = [
        merge_pipeline.serialize_parameters({"recipe": recipe}),
        nightly.serialize_parameters({"config": config}),
        sweep.serialize_parameters({"recipe": recipe, "grid": grid}),
    ]
    assert PLANTED not in json.dumps(stored)
    assert stored[0]["recipe"]["storage_options"]["secret"] == REDACTED


def forms(secret: str) -> list[bytes]:
    """The token as it could be stored: plain, base64 (of each alignment), hex of its bytes."""
    raw = secret.encode()
    out = [raw, raw.hex().encode()]
    for shift in range(3):  # a token inside a longer base64 text starts at any of 3 offsets
        b64 = base64.b64encode(b"x" * shift + raw)[4 if shift else 0 :]
        out.append(b64[: len(b64) - 4])  # the stable middle, without the padded tail
    return out


def holders(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` that holds one of the token's forms."""
    needles = forms(secret)
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(str(path.relative_to(root)))
    return found


def amalgam(args: list[str], work: Path, extra_env: dict[str, str]) -> tuple[str, str]:
    """``amalgam ARGS`` in a process of its own, which must succeed: (stdout, stderr)."""
    done = amalgam_process(args, work, extra_env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr


@pytest.mark.slow
def test_no_store_holds_the_s3_secret_after_run_nightly_and_sweep(
    zoo_tiny, s3, tmp_path: Path
) -> None:
    secret = s3.secret
    assert len(secret) >= 32  # a random token: found only where it leaked
    bucket = s3.make_bucket("secrets-leak")
    fs = s3.filesystem()
    for e in EXPERTS:
        fs.put(str(zoo_tiny.experts[e]) + "/", f"{bucket}/experts/{e}/", recursive=True)
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    (work / "cwd").mkdir(parents=True)
    tracking = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    (work / "mlflow").mkdir()
    options = s3.storage_options(skip_instance_cache=True)
    evaluate = {
        "tasks_dir": str(zoo_tiny.tasks_dir),
        "tasks": TASKS,
        "limit": 8,
        "engine": "quick",
        "device": "cpu",
        "perplexity": False,
    }
    models = [{"uri": f"s3://{bucket}/experts/{e}"} for e in EXPERTS]

    # run: the key written out in the recipe file, the output and its compression on S3
    recipe = {
        "method": "task_arithmetic",
        "base": str(zoo_tiny.base),
        "models": models,
        "params": {"lambda": 0.5},
        "dtype": "float32",
        "output": f"s3://{bucket}/run/merged",
        "storage_options": options,
        "compress": {"density": 0.5, "output": f"s3://{bucket}/run/compressed"},
        "evaluate": evaluate,
        "register": {"tracking_uri": tracking, "model_name": "leak-run"},
    }
    (inputs / "run.yaml").write_text(yaml.safe_dump(recipe))
    logs = [amalgam(["run", str(inputs / "run.yaml")], work, {})]

    # nightly: the key in the config's recipe
    nightly = {
        "experts": f"s3://{bucket}/experts",
        "workdir": str(work / "nightly"),
        "recipe": {
            "method": "continual_ta",
            "base": str(zoo_tiny.base),
            "params": {"lambda": 0.5},
            "dtype": "float32",
            "storage_options": options,
            "evaluate": evaluate,
            "register": {"tracking_uri": tracking, "model_name": "leak-nightly"},
        },
    }
    (inputs / "nightly.yaml").write_text(yaml.safe_dump(nightly))
    logs.append(amalgam(["nightly", str(inputs / "nightly.yaml")], work, {}))

    # sweep: the key from the environment (${VAR} in the recipe)
    swept = {k: v for k, v in recipe.items() if k not in ("output", "compress")}
    swept["storage_options"] = {**options, "secret": "${LEAK_TEST_S3_SECRET}"}
    swept["register"] = {"tracking_uri": tracking, "model_name": "leak-sweep"}
    (inputs / "sweep.yaml").write_text(yaml.safe_dump(swept))
    (inputs / "grid.yaml").write_text(
        yaml.safe_dump({"methods": {"task_arithmetic": {"lambda": [0.5, 1.0]}}})
    )
    sweep_args = ["sweep", str(inputs / "sweep.yaml"), "--grid", str(inputs / "grid.yaml")]
    logs.append(
        amalgam([*sweep_args, "--executor", "local"], work, {"LEAK_TEST_S3_SECRET": secret})
    )
    assert printed_result(logs[0][0])["registered"]
    assert printed_result(logs[1][0])["status"] == "promoted"
    assert len(printed_result(logs[2][0])["leaderboard"]) == 2

    # the commands did their work on S3 ...
    assert fs.exists(f"{bucket}/run/merged/amalgam-commit.json")
    assert fs.exists(f"{bucket}/run/compressed/amalgam-commit.json")
    stores = {p.name for p in work.iterdir()}
    assert {"prefect", "home", "mlflow", "nightly"} <= stores, stores
    # ... into the stores searched below: Prefect's runs (with their parameters and logs),
    # MLflow's recipe artifacts, the score cache and reports
    with sqlite3.connect(f"file:{work / 'prefect' / 'prefect.db'}?mode=ro", uri=True) as db:
        params = [json.loads(p) for (p,) in db.execute("SELECT parameters FROM flow_run")]
        logged = db.execute("SELECT count(*) FROM log").fetchone()[0]
    assert {"recipe": str(inputs / "run.yaml")} in [
        {k: v for k, v in p.items() if k == "recipe"} for p in params
    ], params
    assert {"config": str(inputs / "nightly.yaml")} in params, params
    grid_path = str(inputs / "grid.yaml")
    assert {"recipe": str(inputs / "sweep.yaml"), "grid": grid_path} in params, params
    assert logged > 0
    assert len(list((work / "mlflow").rglob("recipe.yaml"))) >= 3
    assert any((work / "home" / "scores").iterdir())
    assert any((work / "home" / "reports").iterdir())
    # ... and no store, output or log holds the secret
    fs.get(f"{bucket}/run/", str(work / "bucket-copy") + "/", recursive=True)
    leaked = holders(work, secret)
    for command, (out, err) in zip(["run", "nightly", "sweep"], logs, strict=True):
        if any(n in (out + err).encode() for n in forms(secret)):
            leaked.append(f"output of `amalgam {command}`")
    assert leaked == [], f"the S3 secret is stored in: {leaked}"


@pytest.mark.slow
def test_no_store_holds_a_password_from_a_tracking_or_a_model_uri(zoo_tiny, tmp_path: Path) -> None:
    password = "pw-" + secrets.token_hex(16)
    work = tmp_path / "work"
    server = start_mlflow_server(tmp_path / "server", *free_ports(1))
    try:
        # the server and the HTTP file server do not check the password: the clients send it
        tracking = server.url.replace("http://", f"http://amalgam:{password}@")
        with http_folder(zoo_tiny.experts[EXPERTS[0]].parent) as url:
            remote = url.replace("http://", f"http://amalgam:{password}@")
            recipe = {
                "method": "task_arithmetic",
                "base": str(zoo_tiny.base),
                "models": [
                    {"uri": f"{remote}/{EXPERTS[0]}"},
                    {"uri": str(zoo_tiny.experts[EXPERTS[1]])},
                ],
                "params": {"lambda": 0.5},
                "dtype": "float32",
                "output": str(tmp_path / "merged"),
                "evaluate": {
                    "tasks_dir": str(zoo_tiny.tasks_dir),
                    "tasks": TASKS,
                    "limit": 8,
                    "engine": "quick",
                    "device": "cpu",
                    "perplexity": False,
                    # scored from the local copy: an HTTP folder cannot be copied for scoring
                    "experts": {e: str(zoo_tiny.experts[e]) for e in EXPERTS},
                },
                "register": {"tracking_uri": tracking, "model_name": "leak-uri"},
            }
            (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
            logs = [amalgam(["run", str(tmp_path / "run.yaml")], work, {})]
            promote = ["promote", "leak-uri", "1", "--tracking-uri", tracking]
            logs.append(amalgam(promote, work, {}))
        # the password reached MLflow's records only redacted
        lineage = Registry(server.url).lineage("leak-uri", "1")
        assert f"amalgam:{REDACTED}@" in lineage.parents[EXPERTS[0]].uri
    finally:
        server.stop()
    assert printed_result(logs[0][0])["registered"]["version"] == "1"
    assert printed_result(logs[1][0])["version"] == "1"
    # the flow parameters hold the tracking URI without its password
    with sqlite3.connect(f"file:{work / 'prefect' / 'prefect.db'}?mode=ro", uri=True) as db:
        params = [json.loads(p) for (p,) in db.execute("SELECT parameters FROM flow_run")]
    assert {"name": "leak-uri", "version": "1", "tracking_uri": redact_uri(tracking)} in params
    # no store holds the password
    leaked = [f"{w}: {p}" for w in (work, tmp_path / "server") for p in holders(w, password)]
    leaked += holders(tmp_path / "merged", password)
    for command, (out, err) in zip(["run", "promote"], logs, strict=True):
        if any(n in (out + err).encode() for n in forms(password)):
            leaked.append(f"output of `amalgam {command}`")
    assert leaked == [], f"the password is stored in: {leaked}"
