"""Continual baselines and the continual engine: math, chained runs, state checks, CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.engine.continual import STATE_NAME, absorbed_hashes, read_state
from amalgam.errors import CheckpointError, MergeError, OutputError, PlanError, RecipeError
from amalgam.methods.base import Step
from amalgam.recipe import load_recipe, parse_recipe
from tests.helpers import family, llama_tensors, recipe_dict, run_cli, write_model

from . import continual_naive as naive
from .test_opcm import float32_family, floats

CONTINUAL = ["continual_avg", "continual_ta", "continual_ties", "opcm"]


def at(index: int) -> dict:
    return {"continual_step": Step(index)}


def test_continual_avg_hand_worked(merge) -> None:
    base = torch.zeros(2)
    out = merge(
        "continual_avg", base, [torch.tensor([2.0, 4.0]), torch.tensor([5.0, 1.0])], stats=at(3)
    )
    assert torch.equal(out, torch.tensor([3.0, 3.0]))  # (2*[2, 4] + [5, 1]) / 3
    first = merge("continual_avg", base, [torch.tensor([5.0, 1.0])], stats=at(1))
    assert torch.equal(first, torch.tensor([5.0, 1.0]))


def test_continual_ta_hand_worked(merge) -> None:
    base = torch.tensor([1.0, 1.0])
    merged, new = torch.tensor([2.0, 3.0]), torch.tensor([3.0, -1.0])
    out = merge("continual_ta", base, [merged, new], params={"lambda": 0.5}, stats=at(2))
    assert torch.equal(out, torch.tensor([3.0, 2.0]))  # [2, 3] + 0.5 * [2, -2]
    first = merge("continual_ta", base, [new], stats=at(1))  # default lambda 0.3
    assert torch.allclose(first, torch.tensor([1.6, 0.4]))


@pytest.mark.parametrize(
    ("how", "want_delta"),
    [("sum", [6.75, 0.5, 0.5, 2.0, -4.5]), ("mean", [5.375, 0.5, 0.5, 2.0, -4.5])],
)
def test_continual_ties_hand_worked(merge, how: str, want_delta: list[float]) -> None:
    base = torch.ones(5)
    d = torch.tensor([4.0, -1.0, 0.5, 2.0, -3.0])  # trimmed to 40%: [4, 0, 0, 0, -3]
    tau = torch.tensor([1.5, 3.0, 1.0, 0.5, -0.1])  # trimmed: [1.5, 3, 0, 0, 0]
    # elected signs +, +, +, +, -; agreeing sums [5.5, 3, 0, 0, -3], counts [2, 1, 0, 0, 1]
    params = {"density": 0.4, "lambda": 0.5, "merge": how}
    out = merge("continual_ties", base, [base + d, base + tau], params=params, stats=at(2))
    assert torch.allclose(out, 1 + torch.tensor(want_delta))
    first = merge("continual_ties", base, [base + tau], params=params, stats=at(1))
    assert torch.allclose(first, base + 0.5 * tau)  # the first task vector is not trimmed


def test_baseline_merges_match_naive(tmp_path: Path) -> None:
    base_dir, experts, base, tensors = float32_family(tmp_path / "in", 3)
    models = [floats(t) for t in tensors]
    wants = {
        "continual_avg": naive.continual_avg(floats(base), models),
        "continual_ta": naive.continual_ta(floats(base), models, 0.3),
    }
    for method, want in wants.items():
        out = tmp_path / method
        run_merge(parse_recipe(recipe_dict(base_dir, experts, method, out)))
        got = load_file(str(out / "model.safetensors"))
        for k, v in want.items():
            assert torch.allclose(got[k].double(), v, atol=1e-6), (method, k)


def test_continual_ties_chain_matches_stepwise_math(tmp_path: Path, merge) -> None:
    base_dir, experts, base, tensors = float32_family(tmp_path / "in", 3)
    out = tmp_path / "out"
    run_merge(parse_recipe(recipe_dict(base_dir, experts, "continual_ties", out)))
    got = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    state = merge("continual_ties", base[name], [tensors[0][name]], name=name, stats=at(1))
    for i in (1, 2):
        state = merge(
            "continual_ties", base[name], [state, tensors[i][name]], name=name, stats=at(i + 1)
        )
    assert torch.equal(got[name], state)


@pytest.mark.parametrize("method", CONTINUAL)
def test_chained_runs_equal_one_run(tmp_path: Path, method: str) -> None:
    """Three models in one recipe, or one model then two more with continue_from (bf16, so the
    stored state rounds between steps in both): the same tensors and the same state."""
    base, experts = family(tmp_path / "in", 3)
    one = tmp_path / "one"
    run_merge(parse_recipe(recipe_dict(base, experts, method, one)))
    first, second = tmp_path / "first", tmp_path / "second"
    run_merge(parse_recipe(recipe_dict(base, experts[:1], method, first)))
    run_merge(
        parse_recipe(recipe_dict(base, experts[1:], method, second)),
        MergeOptions(continue_from=str(first)),
    )
    a, b = load_file(str(one / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((one / STATE_NAME).read_text()) == json.loads(
        (second / STATE_NAME).read_text()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "in", "one", "second"]
    assert (second / "config.json").is_file()


def test_state_records_history_and_hashes(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in", 2)
    out = tmp_path / "out"
    run_merge(parse_recipe(recipe_dict(base, experts, "continual_ta", out, params={"lambda": 0.4})))
    state = read_state(str(out))
    hashes = [open_checkpoint(str(e)).content_hash() for e in experts]
    assert absorbed_hashes(str(out)) == hashes
    assert [m.label for m in state.models] == ["expert0", "expert1"]
    assert [m.uri for m in state.models] == [str(e) for e in experts]
    assert state.base.content_hash == open_checkpoint(str(base)).content_hash()
    assert (state.method, state.step, state.params) == ("continual_ta", 2, {"lambda": 0.4})


@pytest.fixture
def merged_once(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    base, experts = family(tmp_path / "in", 3)
    first = tmp_path / "first"
    run_merge(parse_recipe(recipe_dict(base, experts[:1], "opcm", first)))
    return base, experts, first


def continue_with(tmp_path: Path, first: Path, base: Path, models: list[Path], **extra) -> None:
    method = extra.pop("method", "opcm")
    out = tmp_path / "next"
    recipe = parse_recipe(recipe_dict(base, models, method, out, **extra))
    try:
        run_merge(recipe, MergeOptions(continue_from=str(first)))
    finally:
        assert not out.exists()


def test_continuing_with_another_method_names_the_field(tmp_path, merged_once) -> None:
    base, experts, first = merged_once
    with pytest.raises(RecipeError, match="method: 'continual_ta' here but 'opcm'"):
        continue_with(tmp_path, first, base, experts[1:], method="continual_ta")


def test_continuing_with_other_params_names_the_field(tmp_path, merged_once) -> None:
    base, experts, first = merged_once
    with pytest.raises(RecipeError, match=r"params\.alpha: 0\.3 here but 0\.5 in the state"):
        continue_with(tmp_path, first, base, experts[1:], params={"alpha": 0.3})


def test_state_without_a_newer_parameter_continues_at_its_default(tmp_path, merged_once) -> None:
    """A state written before OPCM had `projection` ran with it on."""
    base, experts, first = merged_once
    state = json.loads((first / STATE_NAME).read_text())
    del state["params"]["projection"]
    (first / STATE_NAME).write_text(json.dumps(state))
    assert read_state(str(first)).params == {"alpha": 0.5, "projection": True}
    with pytest.raises(RecipeError, match=r"params\.projection: False here but True in the state"):
        continue_with(tmp_path, first, base, experts[1:], params={"projection": False})
    out = tmp_path / "continued"
    recipe = parse_recipe(recipe_dict(base, experts[1:2], "opcm", out))
    run_merge(recipe, MergeOptions(continue_from=str(first)))
    assert read_state(str(out)).params == {"alpha": 0.5, "projection": True}


def test_continuing_from_another_base_names_the_field(tmp_path, merged_once) -> None:
    _, experts, first = merged_once
    other = write_model(tmp_path / "other_base", llama_tensors(5))
    with pytest.raises(RecipeError, match=r"base: .*other_base .* is not the state's base"):
        continue_with(tmp_path, first, other, experts[1:])


def test_continuing_from_a_plain_model_is_an_error(tmp_path, merged_once) -> None:
    base, experts, _ = merged_once
    with pytest.raises(CheckpointError, match=r"continual_state\.json: not found"):
        continue_with(tmp_path, experts[0], base, experts[1:])


def test_corrupt_state_is_an_error(tmp_path, merged_once) -> None:
    base, experts, first = merged_once
    state = json.loads((first / STATE_NAME).read_text())
    state["step"] = "two"
    (first / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="invalid state: step"):
        continue_with(tmp_path, first, base, experts[1:])


def test_non_continual_method_refuses_continue_from(tmp_path, merged_once) -> None:
    base, experts, first = merged_once
    with pytest.raises(RecipeError, match="continue_from: method 'ties' is not a continual"):
        continue_with(tmp_path, first, base, experts[1:], method="ties")


def test_output_may_not_be_the_state(merged_once) -> None:
    base, experts, first = merged_once
    recipe = parse_recipe(recipe_dict(base, experts[1:], "opcm", first))
    with pytest.raises(OutputError, match="output"):
        run_merge(recipe, MergeOptions(continue_from=str(first), overwrite=True))
    assert (first / STATE_NAME).is_file()


def test_bad_model_late_in_the_list_fails_before_any_step(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in", 2)
    bad = llama_tensors(3)
    bad["model.norm.weight"] = torch.ones(9, dtype=torch.bfloat16)
    odd = write_model(tmp_path / "in" / "odd", bad)
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"model\.norm\.weight"):
        run_merge(parse_recipe(recipe_dict(base, [*experts, odd], "continual_avg", out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"params": {"alpha": 1.5}}, r"params\.alpha: must be in \[0\.0, 1\.0\]"),
        ({"params": {"beta": 1}}, r"params\.beta: unknown parameter for 'opcm'"),
        ({"overrides": [{"match": "mlp", "params": {"alpha": 0.2}}]}, "overrides: 'opcm' takes no"),
        ({"files_from": "expert0"}, "files_from: 'opcm' copies config and tokenizer from the base"),
    ],
)
def test_recipe_fields_are_validated(tmp_path: Path, extra: dict, message: str) -> None:
    base, experts = family(tmp_path / "in", 1)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_dict(base, experts, "opcm", tmp_path / "out", **extra))


def test_continual_methods_need_a_base(tmp_path: Path) -> None:
    _, experts = family(tmp_path / "in", 1)
    with pytest.raises(RecipeError, match="base: method 'continual_avg' needs a base"):
        parse_recipe(recipe_dict(None, experts, "continual_avg", tmp_path / "out"))


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("continual_ties", {"merge": "max"}, r"params\.merge: expected one of \['sum', 'mean'\]"),
        ("continual_ties", {"density": 0}, r"params\.density: must be in \(0\.0, 1\.0\]"),
        ("continual_ta", {"lambda": "x"}, r"params\.lambda: expected a number"),
        ("continual_avg", {"lambda": 1}, r"params\.lambda: unknown parameter"),
    ],
)
def test_baseline_params_are_validated(tmp_path: Path, method, params, message) -> None:
    base, experts = family(tmp_path / "in", 1)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_dict(base, experts, method, tmp_path / "out", params=params))


def test_cli_continue_from(tmp_path: Path, monkeypatch, capsys) -> None:
    base, experts = family(tmp_path / "in", 2)
    first, second = tmp_path / "first", tmp_path / "second"
    codes = []
    for models, out, extra in (
        (experts[:1], first, []),
        (experts[1:], second, ["--continue-from", str(first)]),
    ):
        cfg = tmp_path / f"{out.name}.yaml"
        cfg.write_text(yaml.safe_dump(recipe_dict(base, models, "opcm", out)))
        code, out, err = run_cli(["merge", str(cfg), *extra], monkeypatch, capsys)
        codes.append(code)
    assert codes == [0, 0], (out, err)
    assert absorbed_hashes(str(second)) == [open_checkpoint(str(e)).content_hash() for e in experts]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(recipe_dict(base, experts[1:], "continual_ta", tmp_path / "bad")))
    code, _, err = run_cli(["merge", str(cfg), "--continue-from", str(first)], monkeypatch, capsys)
    assert code == 2
    assert "error: continue_from" in err and "method: 'continual_ta' here but 'opcm'" in err
    assert not (tmp_path / "bad").exists()


def test_example_recipe_loads(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZOO", str(tmp_path))
    recipe = load_recipe(Path(__file__).parents[2] / "configs" / "continual_opcm.yaml")
    assert recipe.method == "opcm" and len(recipe.models) == 8
    assert recipe.base == f"{tmp_path}/base"


def test_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in", 3)
    broken = load_file(str(experts[1] / "model.safetensors"))
    broken["model.norm.weight"][0] = float("nan")
    write_model(experts[1], broken)
    with pytest.raises(MergeError, match=r"model\.norm\.weight"):
        run_merge(parse_recipe(recipe_dict(base, experts, "opcm", tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.slow
def test_continual_merge_over_s3(s3, tmp_path: Path) -> None:
    bucket = f"continual-{uuid.uuid4().hex[:8]}"
    s3.make_bucket(bucket)
    fs, opts = s3.filesystem(), s3.storage_options()
    base, experts = family(tmp_path / "in", 3)
    for folder in (base, *experts):
        fs.put(str(folder), f"{bucket}/{folder.name}", recursive=True)
    remote = [f"s3://{bucket}/{p.name}" for p in (base, *experts)]
    first, second = f"s3://{bucket}/first", f"s3://{bucket}/second"
    extra = {"storage_options": opts, "max_shard_size": 700}
    run_merge(parse_recipe(recipe_dict(remote[0], remote[1:2], "opcm", first, **extra)))
    run_merge(
        parse_recipe(recipe_dict(remote[0], remote[2:], "opcm", second, **extra)),
        MergeOptions(continue_from=first),
    )
    local = tmp_path / "local"
    run_merge(parse_recipe(recipe_dict(base, experts, "opcm", local, max_shard_size=700)))
    merged = open_checkpoint(second, **opts)
    assert len(merged.files) > 1
    with open_checkpoint(str(local)) as want:
        for name in want.names():
            assert torch.equal(merged.tensor(name), want.tensor(name)), name
    assert absorbed_hashes(second, **opts) == absorbed_hashes(str(local))
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(bucket, detail=False))
    assert names == ["base", "expert0", "expert1", "expert2", "first", "second"]


def test_steps_left_by_a_killed_run_are_removed_by_the_next(tmp_path: Path) -> None:
    """A continual merge killed between steps leaves its hidden steps folder; the next run of
    the same output removes it once its process is gone (a live process's is kept)."""
    base, experts = family(tmp_path / "in", 2)
    gone = subprocess.Popen(["true"])  # a process that has exited
    gone.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.steps-{host}-{gone.pid}-0123456789ab"
    live = tmp_path / f".out.steps-{host}-{os.getpid()}-0123456789ab"
    for folder in (stale, live):
        (folder / "step-1").mkdir(parents=True)
    run_merge(parse_recipe(recipe_dict(base, experts, "continual_ta", tmp_path / "out")))
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p != live) == ["in", "out"]
