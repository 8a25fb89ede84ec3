"""Adapters that cannot merge: one `error:` line from the CLI naming the adapter and what is
wrong, exit 2, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.adapters.builders import adapter, base_model, edit_config
from tests.helpers import recipe_dict, run_cli
from tests.test_cli import assert_nothing_left, assert_one_error


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic Llama base and one adapter over it (cases copy and change them)."""
    root = tmp_path_factory.mktemp("bad-adapters")
    base = base_model(root / "base")
    return base, adapter(base, root / "lora", seed=1)


def copy_adapter(src: Path, dst: Path, **config) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        edit_config(dst, **config)
    return dst


def other_base(tmp: Path, base: Path, lora: Path) -> dict:
    a = copy_adapter(lora, tmp / "a", base_model_name_or_path="org/llama-a")
    b = copy_adapter(lora, tmp / "b", base_model_name_or_path="org/llama-b")
    return recipe_dict(base, [a, b], "task_arithmetic", tmp / "out")


def wrong_shapes(tmp: Path, base: Path, lora: Path) -> dict:
    wider = base_model(tmp / "wider", intermediate_size=32)
    return recipe_dict(base, [lora, adapter(wider, tmp / "wide", seed=2)], "ties", tmp / "out")


def no_base(tmp: Path, base: Path, lora: Path) -> dict:
    return recipe_dict(None, [lora, lora.parent / "base"], "linear", tmp / "out")


def unmatched_rank_pattern(tmp: Path, base: Path, lora: Path) -> dict:
    odd = copy_adapter(lora, tmp / "odd", rank_pattern={"cross_attn": 2})
    return recipe_dict(base, [lora, odd], "task_arithmetic", tmp / "out")


def bad_config(tmp: Path, base: Path, lora: Path) -> dict:
    odd = copy_adapter(lora, tmp / "odd", r=0, use_rslora="yes")
    return recipe_dict(base, [lora, odd], "task_arithmetic", tmp / "out")


def data_driven(tmp: Path, base: Path, lora: Path) -> dict:
    data = tmp / "data.jsonl"
    data.write_text('{"text": "abc"}\n')
    out = recipe_dict(base, [lora, lora], "regmean", tmp / "out")
    out["models"] = [{"uri": str(lora), "name": f"m{i}", "data": str(data)} for i in range(2)]
    return out


def plus_a_model(tmp: Path, base: Path, lora: Path) -> dict:
    out = recipe_dict(base, [lora], "task_arithmetic", tmp / "out")
    out["models"].append({"uri": f"{base}+{base}", "name": "odd"})
    return out


def adapter_as_base(tmp: Path, base: Path, lora: Path) -> dict:
    out = recipe_dict(lora, [], "task_arithmetic", tmp / "out")
    out["models"] = [{"uri": str(base), "name": f"m{i}"} for i in range(2)]
    return out


CASES: dict[str, tuple[Callable[[Path, Path, Path], dict], tuple[str, ...]]] = {
    "different bases": (other_base, ("adapters of different bases", "org/llama-a", "'b'")),
    "shapes": (wrong_shapes, ("wide does not fit its base", "mlp.up_proj", "[32, 16]")),
    "no base": (no_base, ("a LoRA adapter with no base", "BASE+")),
    "rank pattern": (unmatched_rank_pattern, ("rank_pattern entry 'cross_attn' matches no",)),
    "config": (bad_config, ("invalid adapter config", "r: expected a positive", "use_rslora")),
    "data-driven method": (data_driven, ("is a LoRA adapter", "'regmean'", "merge_and_unload")),
    "plus a model": (plus_a_model, ("is not a PEFT adapter", "'+'")),
    "adapter as base": (adapter_as_base, ("the recipe's base is a LoRA adapter", "BASE+")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line(
    case: str, pair: tuple[Path, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    build, needles = CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(build(tmp_path, *pair)))
    capsys.readouterr()  # what building the inputs printed
    code, _, err = run_cli(["merge", str(recipe)], monkeypatch, capsys)
    assert_one_error(code, err, *needles)
    assert_nothing_left(tmp_path / "out")
