"""mergekit's tokenizer_source and tokenizer section: translated to align.method vocab, and a
mergekit YAML merges to the same bytes as the native recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from amalgam.engine.options import MergeOptions
from amalgam.errors import RecipeError
from amalgam.pipeline import run_pipeline
from amalgam.recipe import Recipe, load_recipe, parse_recipe
from tests.align.test_vocab import family, swapped, zoo  # noqa: F401  (module fixtures)
from tests.helpers import run_cli


def mergekit_cfg(paths: dict[str, Path], **tokenizer: object) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["a"]), "parameters": {"weight": 0.7}},
            {"model": str(paths["b"]), "parameters": {"weight": 0.4}},
        ],
        **tokenizer,
    }


def test_mergekit_union_gives_the_native_recipes_bytes(family, tmp_path):  # noqa: F811
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(mergekit_cfg(family, tokenizer_source="union")))
    native = Recipe.model_validate(
        {
            "method": "task_arithmetic",
            "base": str(family["base"]),
            "models": [
                {"uri": str(family["a"]), "name": "a", "params": {"weight": 0.7}},
                {"uri": str(family["b"]), "name": "b", "params": {"weight": 0.4}},
            ],
            "params": {"normalize": False, "lambda": 1.0},
            "files_from": "base",
            "align": {"method": "vocab", "tokenizer": {"source": "union", "allow_remap": True}},
        }
    )
    outputs = {}
    for name, recipe in (("mergekit", load_recipe(path)), ("native", native)):
        out = tmp_path / name
        run_pipeline(recipe, MergeOptions(output=str(out)))
        outputs[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert outputs["mergekit"] == outputs["native"]
    assert "tokenizer.json" in outputs["native"]


@pytest.mark.parametrize(
    ("tokenizer", "source"),
    [
        ({"tokenizer_source": "union"}, "union"),
        ({"tokenizer_source": "base"}, "base"),
        ({"tokenizer": {"source": "union"}}, "union"),
        ({"tokenizer": {"source": "base"}}, "base"),
        ({"tokenizer_source": "/m/b"}, "model:b"),
        ({"tokenizer_source": "model:/m/b"}, "model:b"),
        ({"tokenizer": {"source": "model:/m/b"}}, "model:b"),
    ],
)
def test_mergekit_tokenizer_forms_translate(tokenizer, source):
    paths = {"base": Path("/m/base"), "a": Path("/m/a"), "b": Path("/m/b")}
    spec = parse_recipe(mergekit_cfg(paths, **tokenizer)).align
    assert spec.method == "vocab"
    assert spec.tokenizer.source == source
    assert spec.tokenizer.allow_remap  # mergekit remaps rows by token, whatever their ids


def test_mergekit_base_in_the_models_is_named_by_label():
    data = {
        "merge_method": "linear",
        "base_model": "/m/base",
        "models": [{"model": "/m/a"}, {"model": "/m/base"}],
        "parameters": {"weight": 1.0},
        "tokenizer_source": "base",
    }
    spec = parse_recipe(data).align.tokenizer
    assert (spec.source, spec.special_tokens) == ("model:base-2", "model:base-2")


@pytest.mark.parametrize(
    ("tokenizer", "field"),
    [
        ({"tokenizer_source": "/m/nope"}, "tokenizer_source"),
        ({"tokenizer": {"source": "/m/nope"}}, "tokenizer.source"),
        ({"tokenizer": {"source": "union", "strip": True}}, "tokenizer.strip"),
        ({"tokenizer": {"source": "union"}, "tokenizer_source": "union"}, "tokenizer"),
    ],
)
def test_mergekit_tokenizer_refusals_name_the_field(tokenizer, field):
    paths = {"base": Path("/m/base"), "a": Path("/m/a"), "b": Path("/m/b")}
    with pytest.raises(RecipeError, match=f"merge.yml: {field}"):
        parse_recipe(mergekit_cfg(paths, **tokenizer), "merge.yml")


def test_mergekit_token_sources_translate():
    paths = {"base": Path("/m/base"), "a": Path("/m/a"), "b": Path("/m/b")}
    tokens = {
        "<|im_start|>": {"source": "/m/a"},
        "<|eot|>": {"source": "/m/b", "force": True},
        "<pad>": {"source": {"kind": "zero"}},
    }
    tokenizer = {"tokens": tokens, "pad_to_multiple_of": 64}
    spec = parse_recipe(mergekit_cfg(paths, tokenizer=tokenizer)).align.tokenizer
    assert (spec.source, spec.pad_to_multiple_of) == ("union", 64)
    got = {t: (r.source, r.force) for t, r in spec.tokens.items()}
    assert got == {
        "<|im_start|>": ("model:a", False),
        "<|eot|>": ("model:b", True),
        "<pad>": ("zero", False),
    }


def test_mergekit_model_token_source_is_refused():
    paths = {"base": Path("/m/base"), "a": Path("/m/a"), "b": Path("/m/b")}
    source = {"kind": "model_token", "model": "/m/a", "token": "<x>"}
    cfg = mergekit_cfg(paths, tokenizer={"tokens": {"<y>": {"source": source}}})
    with pytest.raises(RecipeError, match=r"merge.yml: tokenizer.tokens.<y>.source: only a model"):
        parse_recipe(cfg, "merge.yml")


def test_amalgam_merge_runs_the_vocab_union(family, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(mergekit_cfg(family, tokenizer_source="union")))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", str(path), "--output", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(out).convert_ids_to_tokens(375) == "<call>"


def test_amalgam_merge_refuses_a_token_under_another_id(zoo, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    moved = swapped(zoo.experts["zoo_caesar"], tmp_path / "moved", "<pad>", "<unk>")
    recipe = {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(moved)}],
        "output": str(tmp_path / "out"),
        "align": {"method": "vocab", "tokenizer": {"source": "base"}},
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["merge", str(path)], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: token '<unk>' has id 0 in 'moved' but 1 in 'base'")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()
