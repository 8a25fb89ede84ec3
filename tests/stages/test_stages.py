"""Each stage's content key and store check, without an orchestrator."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from stage_recipes import ta_recipe

import amalgam.stages.evaluate as evaluate
from amalgam.checkpoint import open_checkpoint
from amalgam.compress import decompress_model, read_manifest
from amalgam.engine import MergeOptions
from amalgam.evaluate.results import ModelResult
from amalgam.fetch import FetchedModel
from amalgam.recipe import EvaluateSpec, parse_recipe
from amalgam.stages import (
    CompressInput,
    CompressStage,
    FetchInput,
    FetchStage,
    MergeInput,
    MergeStage,
    RegisterInput,
    RegisterStage,
    ScoreInput,
    ScoreStage,
    Stage,
    execute,
)

EXPERTS = ["zoo_count", "zoo_compare"]


def recipe_of(zoo, output: Path, **changes):
    return parse_recipe(ta_recipe(zoo, output, EXPERTS, **changes))


def fake_inputs(recipe) -> list[FetchedModel]:
    labels = ["base", *(m.label for m in recipe.models)]
    return [
        FetchedModel(lb, f"/x/{lb}", f"sha256:{lb}", 1, ("model.safetensors",), "model")
        for lb in labels
    ]


def test_merge_key_is_content_not_location_or_credentials(zoo_tiny, tmp_path: Path) -> None:
    stage = MergeStage()
    recipe = recipe_of(zoo_tiny, tmp_path / "a")
    key = stage.key(MergeInput(recipe, MergeOptions(), fake_inputs(recipe)))
    moved = recipe.model_copy(
        update={"output": str(tmp_path / "b"), "storage_options": {"key": "secret"}}
    )
    assert stage.key(MergeInput(moved, MergeOptions(threads=1), fake_inputs(recipe))) == key
    # the same content read from elsewhere: other URIs, same labels and hashes
    copies = [
        m.model_copy(update={"uri": f"/copy/{m.label}", "name": m.label}) for m in recipe.models
    ]
    elsewhere = recipe.model_copy(update={"models": copies, "base": "/copy/base"})
    assert stage.key(MergeInput(elsewhere, MergeOptions(), fake_inputs(recipe))) == key
    # later stages' sections do not change the merge
    evaluated = recipe.model_copy(update={"evaluate": EvaluateSpec(tasks_dir="/t")})
    assert stage.key(MergeInput(evaluated, MergeOptions(), fake_inputs(recipe))) == key
    other = recipe_of(zoo_tiny, tmp_path / "a", params={"lambda": 0.7})
    assert stage.key(MergeInput(other, MergeOptions(), fake_inputs(recipe))) != key
    changed = [
        *fake_inputs(recipe)[:-1],
        FetchedModel("zoo_compare", "/x", "sha256:new", 1, ("model.safetensors",), "model"),
    ]
    assert stage.key(MergeInput(recipe, MergeOptions(), changed)) != key


@pytest.mark.slow
def test_merge_and_compress_done_read_the_store(zoo_tiny, tmp_path: Path, home: Path) -> None:
    recipe = recipe_of(
        zoo_tiny, tmp_path / "merged", compress={"density": 0.3, "output": str(tmp_path / "c")}
    )
    inputs = execute(FetchStage(), FetchInput(recipe)).models
    job = MergeInput(recipe, MergeOptions(), inputs)
    merge = MergeStage()
    assert merge.done(job) is None
    merged = execute(merge, job)
    assert not merged.skipped
    assert merge.done(job) == merged.__class__(merged.output, merged.content_hash, True)
    other = recipe_of(zoo_tiny, tmp_path / "merged", params={"lambda": 0.7})
    assert merge.done(MergeInput(other, MergeOptions(), inputs)) is None

    compress = CompressStage()
    packed = CompressInput(recipe, merged, inputs)
    assert compress.done(packed) is None
    assert not execute(compress, packed).skipped
    assert compress.done(packed).skipped
    denser = recipe.model_copy(
        update={"compress": recipe.compress.model_copy(update={"density": 0.5})}
    )
    assert compress.done(CompressInput(denser, merged, inputs)) is None
    assert compress.key(CompressInput(denser, merged, inputs)) != compress.key(packed)

    shutil.rmtree(tmp_path / "c")
    assert compress.done(packed) is None
    shutil.rmtree(tmp_path / "merged")
    assert merge.done(job) is None  # a deleted output is work to do again


def test_tall_compression_stores_the_experts_and_skips_when_done(
    zoo_tiny, tmp_path: Path, home: Path
) -> None:
    out = tmp_path / "tall"
    compress = {"method": "tall", "tall_lambda": 0.3, "output": str(out)}
    recipe = recipe_of(zoo_tiny, tmp_path / "merged", compress=compress)
    inputs = execute(FetchStage(), FetchInput(recipe)).models
    merged = execute(MergeStage(), MergeInput(recipe, MergeOptions(), inputs))
    stage = CompressStage()
    job = CompressInput(recipe, merged, inputs)
    assert stage.done(job) is None
    done = execute(stage, job)
    experts = {m.label: m for m in inputs if m.label != "base"}
    assert list(experts) == EXPERTS
    assert not done.skipped
    assert done.details["dense_bytes"] == sum(m.nbytes for m in experts.values())
    manifest = read_manifest(str(out))
    assert {t: e["hash"] for t, e in manifest["tasks"].items()} == {
        t: m.content_hash for t, m in experts.items()
    }
    assert manifest["settings"] == {"method": "tall", "tall_lambda": 0.3}
    assert stage.done(job).skipped
    # the experts are stored, whatever the merge: another merge finds the same storage done
    other = CompressInput(recipe, dataclasses.replace(merged, content_hash="sha256:x"), inputs)
    assert stage.key(other) == stage.key(job) and stage.done(other).skipped
    looser = recipe.model_copy(
        update={"compress": recipe.compress.model_copy(update={"tall_lambda": 0.5})}
    )
    assert stage.done(CompressInput(looser, merged, inputs)) is None
    assert stage.key(CompressInput(looser, merged, inputs)) != stage.key(job)
    rebuilt = decompress_model(str(out), None, str(tmp_path / "count"), task="zoo_count")
    with open_checkpoint(rebuilt) as r, open_checkpoint(str(zoo_tiny.experts["zoo_count"])) as e:
        assert r.names() == e.names()


def test_a_changed_output_is_merged_again_not_trusted(
    zoo_tiny, tmp_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One matrix zeroed in a finished merge (same size, provenance untouched): the next run
    does not skip it, says why, and writes the merge's true bytes back."""
    recipe = recipe_of(zoo_tiny, tmp_path / "merged")
    inputs = execute(FetchStage(), FetchInput(recipe)).models
    job = MergeInput(recipe, MergeOptions(), inputs)
    first = execute(MergeStage(), job)
    shard = tmp_path / "merged" / "model.safetensors"
    tensors, meta = load_file(str(shard)), safe_open(str(shard), "pt").metadata()
    name = next(n for n in sorted(tensors) if tensors[n].ndim == 2)
    save_file({**tensors, name: torch.zeros_like(tensors[name])}, str(shard), meta)
    assert MergeStage().done(job) is None
    with caplog.at_level(logging.WARNING, logger="amalgam"):
        again = execute(MergeStage(), job)
    assert not again.skipped and again.content_hash == first.content_hash
    assert "differ from its commit record" in caplog.text


def test_staging_changes_neither_the_recipe_nor_its_merge(
    zoo_tiny, tmp_path: Path, home: Path
) -> None:
    """``--stage`` reads local copies; the recipe, its hash, the output's provenance and the
    lineage keep the recipe's URIs, so an unstaged re-run skips the staged run's merge."""
    recipe = recipe_of(zoo_tiny, tmp_path / "merged")
    staged = execute(FetchStage(), FetchInput(recipe, stage=True))
    assert staged.recipe == recipe
    assert set(staged.read_from) == {"base", *(m.label for m in recipe.models)}
    assert all(Path(uri).is_relative_to(home) for uri in staged.read_from.values())
    options = staged.merge_options(MergeOptions())
    merged = execute(MergeStage(), MergeInput(recipe, options, staged.models))
    with safe_open(str(Path(merged.output) / "model.safetensors"), "pt") as fh:
        assert fh.metadata()["recipe_hash"] == recipe.hash()
    plain = execute(FetchStage(), FetchInput(recipe))
    again = execute(MergeStage(), MergeInput(recipe, MergeOptions(), plain.models))
    assert again.skipped and again.content_hash == merged.content_hash


def score_input(tmp_path: Path, **changes) -> ScoreInput:
    spec = EvaluateSpec(tasks_dir=str(tmp_path), tasks=["t"], device="cpu")
    values = {
        "uri": "/models/a",
        "content_hash": "sha256:aaa",
        "spec": spec,
        "tasks": ["t"],
        "perplexity": False,
        "data": "sha256:data",
        "storage_options": {},
        **changes,
    }
    return ScoreInput(**values)


def test_score_key_ignores_location_device_and_credentials(tmp_path: Path) -> None:
    stage = ScoreStage()
    key = stage.key(score_input(tmp_path))
    gpu = EvaluateSpec(tasks_dir=str(tmp_path), tasks=["t"], device="cuda")
    same = score_input(tmp_path, uri="s3://b/a", spec=gpu, storage_options={"secret": "x"})
    assert stage.key(same) == key
    assert stage.key(score_input(tmp_path, content_hash="sha256:bbb")) != key
    assert stage.key(score_input(tmp_path, data="sha256:new")) != key
    assert stage.key(score_input(tmp_path, perplexity=True)) != key


def test_scores_are_cached_on_disk_and_a_bad_cache_file_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def score_model(uri, spec, tasks, perplexity=False, **so) -> ModelResult:
        calls.append(uri)
        return ModelResult.from_correct(uri, {"t": [True, False]})

    monkeypatch.setattr(evaluate, "score_model", score_model)
    stage = ScoreStage(tmp_path / "scores")
    job = score_input(tmp_path)
    first = execute(stage, job)
    again = execute(stage, score_input(tmp_path, uri="/elsewhere/a"))  # same weights
    assert calls == ["/models/a"]
    assert again.uri == "/elsewhere/a" and again.tasks == first.tasks
    assert [p.name for p in (tmp_path / "scores").iterdir()] == [f"{stage.key(job)}.json"]
    stage.path(job).write_text('{"uri": "/models/a", "tasks": {')  # a partial write
    assert stage.done(job) is None
    assert execute(stage, job) == first
    assert calls == ["/models/a", "/models/a"]


@pytest.mark.slow
def test_register_done_finds_the_version_by_content(
    zoo_tiny, tmp_path: Path, home: Path, tracking_uri: str
) -> None:
    recipe = recipe_of(
        zoo_tiny,
        tmp_path / "merged",
        register={"tracking_uri": tracking_uri, "model_name": "r", "gates": {}},
    )
    inputs = execute(FetchStage(), FetchInput(recipe)).models
    merged = execute(MergeStage(), MergeInput(recipe, MergeOptions(), inputs))
    stage = RegisterStage()
    job = RegisterInput(recipe, merged, inputs)
    assert stage.done(job) is None
    registered = execute(stage, job)
    assert registered.created
    assert stage.done(job) == registered.__class__(
        "r", registered.version, registered.run_id, created=False
    )
    other = RegisterInput(recipe, merged.__class__("x", "sha256:other", False), inputs)
    assert stage.done(other) is None
    assert stage.key(other) != stage.key(job)


class Counting(Stage[int, int]):
    name = "counting"

    def __init__(self, stored: dict[int, int]):
        self.stored, self.runs = stored, 0

    def key(self, inp: int) -> str:
        return str(inp)

    def done(self, inp: int) -> int | None:
        return self.stored.get(inp)

    def skip_reason(self, inp: int, out: int) -> str:
        return f"{inp} is stored"

    def run(self, inp: int) -> int:
        self.runs += 1
        self.stored[inp] = inp * 2
        return inp * 2


def test_execute_runs_only_what_is_not_done(caplog: pytest.LogCaptureFixture) -> None:
    stage = Counting({})
    with caplog.at_level(logging.INFO, logger="amalgam"):
        assert execute(stage, 2) == 4
        assert execute(stage, 2) == 4
    assert stage.runs == 1
    assert "counting skipped: 2 is stored" in caplog.messages


@pytest.mark.slow
def test_a_model_scored_as_a_ray_task_scores_as_here(zoo_tiny, tmp_path: Path) -> None:
    """executor: ray sends the scoring to the cluster (a GPU node where it has one)."""
    tasks = zoo_tiny.task_names[:2]
    spec = EvaluateSpec(
        tasks_dir=str(zoo_tiny.tasks_dir), tasks=tasks, limit=8, engine="quick", device="cpu"
    )
    uri = str(zoo_tiny.experts[tasks[0]])
    job = score_input(tmp_path, uri=uri, spec=spec, tasks=tasks, perplexity=True)
    here = ScoreStage(tmp_path / "here").run(job)
    on_ray = ScoreStage(tmp_path / "ray").run(dataclasses.replace(job, executor="ray"))
    assert on_ray == here and set(here.tasks) == set(tasks)
