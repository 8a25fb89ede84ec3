"""mergekit YAML for della, della_linear, sce, nuslerp, multislerp and karcher: translated with
mergekit 0.1.5's parameter names and defaults, refused with the field named, and merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import RecipeError
from amalgam.recipe import Recipe, parse_recipe

SOURCE = "cfg.yml"


def parse(cfg: dict[str, Any]) -> Recipe:
    return parse_recipe(cfg, SOURCE)


def cfg_for(method: str, *, base: bool = True, n: int = 2, **model_params: Any) -> dict[str, Any]:
    models = [{"model": f"/m/{chr(97 + i)}"} for i in range(n)]
    for m in models:
        if model_params:
            m["parameters"] = dict(model_params)
    cfg: dict[str, Any] = {"merge_method": method, "models": models}
    if base:
        cfg["base_model"] = "/m/base"
    return cfg


def refused(cfg: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse(cfg)
    text = str(err.value)
    assert text.startswith(f"{SOURCE}: ") or SOURCE in text, text
    assert field in text and message in text, text


@pytest.mark.parametrize(("method", "normalize"), [("della", True), ("della_linear", False)])
def test_della_takes_mergekit_defaults(method, normalize):
    r = parse(cfg_for(method, weight=0.5))
    assert r.method == method and r.base == "/m/base"
    assert r.params["density"] == 1.0 and r.params["epsilon"] == 0.15
    assert r.params["rescale"] == "l1" and r.params["normalize"] is normalize
    assert r.params["lambda"] == 1.0
    assert ("consensus" in r.params) is (method == "della")
    assert [m.params for m in r.models] == [{"weight": 0.5}, {"weight": 0.5}]


def test_della_per_model_density_epsilon_and_rescale_off():
    cfg = cfg_for("della", weight=1.0, density=0.5, epsilon=0.1)
    cfg["parameters"] = {"rescale": False, "lambda": 0.7}
    r = parse(cfg)
    assert r.params["rescale"] == "none" and r.params["lambda"] == 0.7
    assert r.models[0].params == {"weight": 1.0, "density": 0.5, "epsilon": 0.1}


def test_della_density_epsilon_outside_the_unit_interval_is_refused():
    # mergekit raises at merge time for density +/- epsilon outside (0, 1); amalgam up front
    refused(cfg_for("della", weight=1.0, density=0.9), "models[0].params", "epsilon")


def test_sce_select_topk_and_default():
    assert parse(cfg_for("sce")).params == {"select_topk": 1.0}
    cfg = cfg_for("sce")
    cfg["parameters"] = {"select_topk": 0.1, "int8_mask": True}
    r = parse(cfg)
    assert r.params == {"select_topk": 0.1} and r.base == "/m/base"


def test_sce_has_no_weight():
    refused(cfg_for("sce", weight=1.0), "models[0].parameters.weight", "unknown parameter")


def test_sce_needs_a_base():
    refused(cfg_for("sce", base=False), "base_model", "needs a base_model")


def test_nuslerp_with_and_without_base():
    cfg = cfg_for("nuslerp", weight=0.5)
    cfg["parameters"] = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    r = parse(cfg)
    assert r.base == "/m/base" and r.files_from == "base"
    assert r.params == {"flatten": False, "row_wise": True}
    r = parse(cfg_for("nuslerp", base=False, weight=0.5))
    assert r.base is None and r.params == {"flatten": True, "row_wise": False}
    assert [m.uri for m in r.models] == ["/m/a", "/m/b"]


@pytest.mark.parametrize("n", [1, 3])
def test_nuslerp_takes_exactly_two_models(n):
    refused(cfg_for("nuslerp", n=n, weight=1.0), "models", "exactly 2")


def test_nuslerp_base_listed_among_the_two_leaves_one():
    cfg = cfg_for("nuslerp", weight=1.0)
    cfg["base_model"] = "/m/a"
    refused(cfg, "models", "exactly 2 models besides any base_model; got 1")


def test_nuslerp_weight_has_no_default():
    refused(cfg_for("nuslerp"), "models[0].parameters.weight", "no default")


def test_multislerp_parameters():
    cfg = cfg_for("multislerp", base=False, n=3, weight=1.0)
    cfg["parameters"] = {"normalize_weights": False, "eps": 1e-6}
    r = parse(cfg)
    assert r.base is None and len(r.models) == 3
    assert r.params == {"normalize_weights": False, "eps": 1e-6}
    refused(cfg_for("multislerp", n=3), "models[0].parameters.weight", "no default")


def test_karcher_merges_the_base_model_as_an_input():
    cfg = cfg_for("karcher", n=2)
    cfg["parameters"] = {"max_iter": 20, "tol": 1e-6}
    r = parse(cfg)
    assert r.base is None and [m.uri for m in r.models] == ["/m/a", "/m/b", "/m/base"]
    assert r.params == {"max_iter": 20, "tol": 1e-6} and isinstance(r.params["max_iter"], int)


def test_karcher_refusals():
    cfg = cfg_for("karcher")
    cfg["parameters"] = {"max_iter": 2.5}
    refused(cfg, "parameters.max_iter", "expected an integer")
    refused(cfg_for("karcher", weight=1.0), "models[0].parameters.weight", "unknown parameter")


# -- merged through the engine: the translated recipe equals the recipe written by hand ------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("family")
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (12, 8), "model.norm.weight": (8,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1}
    paths = {}
    for name, scale in [("base", 0.0), ("e0", 0.1), ("e1", 0.1), ("e2", 0.1)]:
        folder = root / name
        folder.mkdir()
        tensors = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        paths[name] = str(folder)
    return paths


def merged(recipe: Recipe, out: Path) -> dict[str, torch.Tensor]:
    run_merge(recipe, MergeOptions(output=str(out), device="cpu"))
    return load_file(str(next(out.glob("*.safetensors"))))


@pytest.mark.parametrize(
    ("mk", "hand"),
    [
        (
            {"merge_method": "sce", "parameters": {"select_topk": 0.5}},
            {"method": "sce", "params": {"select_topk": 0.5}},
        ),
        (
            {"merge_method": "nuslerp", "weights": [0.3, 0.7], "n": 2},
            {"method": "nuslerp", "weights": [0.3, 0.7], "params": {}},
        ),
        (
            {"merge_method": "multislerp", "weights": [1.0, 2.0, 1.0], "no_base": True},
            {"method": "multislerp", "weights": [1.0, 2.0, 1.0], "params": {}, "no_base": True},
        ),
    ],
    ids=["sce", "nuslerp", "multislerp"],
)
def test_translated_merge_equals_hand_recipe(family, tmp_path, mk, hand):
    n = mk.pop("n", 3)
    experts = [family[f"e{i}"] for i in range(n)]
    weights = mk.pop("weights", None)
    no_base = mk.pop("no_base", False)
    cfg = {**mk, "models": [{"model": e} for e in experts], "dtype": "float32"}
    if not no_base:
        cfg["base_model"] = family["base"]
    if weights:
        for m, w in zip(cfg["models"], weights, strict=True):
            m["parameters"] = {"weight": w}
    models = [
        {"uri": e, "name": f"m{i}", "params": {"weight": w} if weights else {}}
        for i, (e, w) in enumerate(zip(experts, weights or [None] * n, strict=True))
    ]
    recipe = {"method": hand["method"], "models": models, "params": hand["params"]}
    recipe["dtype"] = "float32"
    if not no_base:
        recipe |= {"base": family["base"], "files_from": "base"}
    got = merged(parse(cfg), tmp_path / "mk")
    want = merged(parse_recipe(recipe, "hand.yml"), tmp_path / "hand")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    first = load_file(str(Path(experts[0]) / "model.safetensors"))
    assert any(not torch.equal(want[k], first[k]) for k in want)
