"""Tensors only some inputs hold: one rule (``extra_tensors``) for the merge plan and the align
check, so ``amalgam merge`` and ``amalgam run`` accept and refuse the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from amalgam.align import CompatibilityError, check_compatibility
from amalgam.align.tensor_sets import tensor_sources
from amalgam.checkpoint import TensorInfo
from amalgam.engine import MergeOptions, plan_recipe, run_merge
from amalgam.errors import AmalgamError, PlanError
from amalgam.pipeline import run_pipeline
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict, run_cli

LM_HEAD = "lm_head.weight"
POSITION_IDS = "embeddings.position_ids"
BUFFER = "model.rotary.extra_ids"


def _edit(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _head(seed: int) -> torch.Tensor:
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


# case -> (edit of (base, expert0, expert1), expected output tensor per setting: the input it
# comes from (an index into (base, expert0, expert1)), None (left out) or "error")
CASES: dict[str, tuple[Callable[[list[Path]], None], str, dict[str, int | str | None]]] = {
    "lm_head in one expert": (
        lambda m: _edit(m[2], lambda t: t.update({LM_HEAD: _head(1)})),
        LM_HEAD,
        {"error": "error", "keep_from_first": 2, "drop": None},
    ),
    "lm_head in the base only": (
        lambda m: _edit(m[0], lambda t: t.update({LM_HEAD: _head(2)})),
        LM_HEAD,
        {"error": "error", "keep_from_first": 0, "drop": None},
    ),
    "a float tensor missing from one expert": (
        lambda m: _edit(m[1], lambda t: t.pop("model.norm.weight")),
        "model.norm.weight",
        {"error": "error", "keep_from_first": 0, "drop": None},
    ),
    "position_ids in the base only": (
        lambda m: _edit(m[0], lambda t: t.update({POSITION_IDS: torch.arange(16)[None]})),
        POSITION_IDS,
        {"error": 0, "keep_from_first": 0, "drop": 0},
    ),
    "a buffer in one expert only": (
        lambda m: _edit(m[1], lambda t: t.update({BUFFER: torch.arange(5, dtype=torch.int32)})),
        BUFFER,
        {"error": "error", "keep_from_first": 1, "drop": None},
    ),
}
SETTINGS = ("error", "keep_from_first", "drop")


def _inputs(tmp_path: Path, case: str) -> tuple[list[Path], str, dict]:
    base, experts = family(tmp_path / "in", n=2)
    edit, name, expected = CASES[case]
    edit([base, *experts])
    return [base, *experts], name, expected


def _recipe(models: list[Path], out: Path, setting: str, method: str = "task_arithmetic"):
    data = recipe_dict(models[0], models[1:], method, out)
    if setting != "error":
        data["extra_tensors"] = setting
    return parse_recipe(data)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_run_accept_and_refuse_the_same_inputs(
    case: str, setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    models, name, expected = _inputs(tmp_path, case)
    want = expected[setting]
    merged, piped = tmp_path / "merged", tmp_path / "piped"
    if want == "error":
        with pytest.raises(PlanError) as plan_err:
            run_merge(_recipe(models, merged, setting), MergeOptions(device="cpu"))
        with pytest.raises(CompatibilityError) as align_err:  # refused by the align stage
            run_pipeline(_recipe(models, piped, setting), MergeOptions(device="cpu"))
        for message in (str(plan_err.value), str(align_err.value)):
            assert name in message and "extra_tensors" in message
        assert not merged.exists() and not piped.exists()
        return
    run_merge(_recipe(models, merged, setting), MergeOptions(device="cpu"))
    run_pipeline(_recipe(models, piped, setting), MergeOptions(device="cpu"))
    assert (merged / "model.safetensors").read_bytes() == (piped / "model.safetensors").read_bytes()
    out = _tensors(merged)
    if want is None:
        assert name not in out
        plan = plan_recipe(_recipe(models, tmp_path / "p", setting))
        assert f"{name}: left out, not in every input (extra_tensors: drop)" in plan.describe()
    else:
        source = _tensors(models[want])[name]
        assert out[name].dtype == source.dtype and torch.equal(out[name], source)  # bit-exact
    merged_names = {n for n, t in out.items() if t.is_floating_point()} - {name}
    assert "model.layers.0.mlp.up_proj.weight" in merged_names


def test_the_rule_on_tables() -> None:
    def info(name: str, dtype: str = "BF16", shape: tuple[int, ...] = (2,)) -> TensorInfo:
        return TensorInfo(name, dtype, shape, "f", 0, 4)

    base = {"w": info("w"), "ids": info("ids", "I64")}
    tables = {"base": base, "a": {"w": info("w"), "head": info("head")}, "b": {"w": info("w")}}
    sets = tensor_sources(tables)
    assert [(s.name, s.origin, s.source) for s in sets.sources] == [
        ("ids", "copy", "base"),
        ("w", "merge", "base"),
    ]
    (problem,) = sets.problems
    assert str(problem).startswith(
        "missing tensor 'head': models 'base', 'b' lack it, model 'a' has it"
    )
    kept = tensor_sources(tables, "keep_from_first")
    assert not kept.problems and [(s.name, s.source) for s in kept.taken("keep")] == [("head", "a")]
    assert [s.name for s in tensor_sources(tables, "drop").taken("drop")] == ["head"]
    odd = {**tables, "b": {"w": info("w", shape=(3,)), "ids": info("ids", "F32")}}
    kinds = sorted(p.kind for p in tensor_sources(odd, "drop").problems)
    assert kinds == ["dtype", "shape"]  # never settled by extra_tensors


def test_the_cli_refuses_with_one_line_naming_tensor_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    models, _, _ = _inputs(tmp_path, "lm_head in one expert")
    out = tmp_path / "out"
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe_dict(models[0], models[1:], "ties", out)))
    code, _, err = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"missing tensor '{LM_HEAD}'" in lines[0] and "model 'expert1' has it" in lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    data = {**recipe_dict(models[0], models[1:], "ties", out), "extra_tensors": "drop"}
    cfg.write_text(yaml.safe_dump(data))
    code, stdout, _ = run_cli(["merge", str(cfg), "--plan"], monkeypatch, capsys)
    assert code == 0 and f"{LM_HEAD}: left out" in stdout and not out.exists()
    code, stdout, _ = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    assert code == 0 and f"left out: {LM_HEAD}" in stdout
    assert LM_HEAD not in _tensors(out)


def test_the_align_report_names_the_model(tmp_path: Path) -> None:
    models, _, _ = _inputs(tmp_path, "lm_head in one expert")
    labelled = {"base": str(models[0]), "expert0": str(models[1]), "expert1": str(models[2])}
    report = check_compatibility(labelled, raise_on_error=False)
    assert [str(p) for p in report.problems] == [
        f"expert1: has tensor {LM_HEAD}, which the reference lacks"
    ]
    assert check_compatibility(labelled, extra_tensors="keep_from_first").ok
    models, _, _ = _inputs(tmp_path / "2", "a float tensor missing from one expert")
    labelled = {"base": str(models[0]), "expert0": str(models[1]), "expert1": str(models[2])}
    with pytest.raises(CompatibilityError, match=r"expert0: lacks tensor model\.norm\.weight"):
        check_compatibility(labelled)


def test_a_kept_tensor_takes_the_output_dtype(tmp_path: Path) -> None:
    models, _, _ = _inputs(tmp_path, "lm_head in one expert")
    data = recipe_dict(models[0], models[1:], "ties", tmp_path / "out")
    recipe = parse_recipe({**data, "extra_tensors": "keep_from_first", "dtype": "float32"})
    run_merge(recipe, MergeOptions(device="cpu"))
    out = _tensors(tmp_path / "out")
    assert torch.equal(out[LM_HEAD], _tensors(models[2])[LM_HEAD].float())
    plan = plan_recipe(recipe, MergeOptions(overwrite=True))
    assert f"{LM_HEAD}: copied unmerged from 'expert1'" in plan.describe()


def test_a_kept_tensor_is_checked_for_nan(tmp_path: Path) -> None:
    models, _, _ = _inputs(tmp_path, "lm_head in one expert")
    _edit(models[2], lambda t: t[LM_HEAD].view(-1).__setitem__(0, float("nan")))
    recipe = _recipe(models, tmp_path / "out", "keep_from_first")
    with pytest.raises(AmalgamError, match=f"tensor '{LM_HEAD}' of model 'expert1' holds NaN"):
        run_merge(recipe, MergeOptions(device="cpu"))


# continual merges absorb one model per step: the rule holds step by step


@pytest.mark.parametrize("setting", ["keep_from_first", "drop"])
def test_a_continual_merge_keeps_the_first_experts_tensor_step_by_step(
    setting: str, tmp_path: Path
) -> None:
    base, experts = family(tmp_path / "in", n=3)
    for i in (1, 2):
        _edit(experts[i], lambda t, i=i: t.update({LM_HEAD: _head(10 + i)}))
    recipe = _recipe([base, *experts], tmp_path / "out", setting, "continual_avg")
    run_merge(recipe, MergeOptions(device="cpu"))
    out = _tensors(tmp_path / "out")
    if setting == "drop":
        assert LM_HEAD not in out
    else:  # absorbing expert2 keeps expert1's copy: the first model that has it, as one pass
        assert torch.equal(out[LM_HEAD], _tensors(experts[1])[LM_HEAD])
    with pytest.raises(PlanError, match=LM_HEAD):
        run_merge(_recipe([base, *experts], tmp_path / "o2", "error", "continual_avg"))


def test_a_continual_merge_refuses_keep_where_a_later_step_would_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    models, _, _ = _inputs(tmp_path, "a float tensor missing from one expert")
    recipe = _recipe(models, tmp_path / "out", "keep_from_first", "continual_avg")
    with pytest.raises(PlanError, match="keep_from_first cannot hold in a continual merge"):
        run_merge(recipe, MergeOptions(device="cpu"))
    with pytest.raises(CompatibilityError, match="keep_from_first cannot hold"):
        run_pipeline(recipe, MergeOptions(device="cpu"))
    assert not (tmp_path / "out").exists()
    run_merge(_recipe(models, tmp_path / "out", "drop", "continual_avg"))
    assert "model.norm.weight" not in _tensors(tmp_path / "out")
