"""mergekit configs with ``slices:`` and of the methods passthrough, nearswap, arcee_fusion,
ram and ramplus_tl translate to the recipe mergekit's semantics call for, and what amalgam
cannot reproduce is refused, naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from amalgam.errors import RecipeError
from amalgam.methods import get_method
from amalgam.methods.params import resolve_params
from amalgam.recipe import Recipe, parse_recipe

SOURCE = "merge.yml"


def parse(cfg: dict[str, Any]) -> Recipe:
    return parse_recipe(cfg, SOURCE)


def frankenmerge(**extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "/m/a", "layer_range": [0, 24]}]},
            {"sources": [{"model": "/m/b", "layer_range": [20, 40]}]},
            {"sources": [{"model": "/m/a", "layer_range": [30, 40]}]},
        ],
        **extra,
    }


def test_passthrough_slices():
    r = parse(frankenmerge(dtype="float16"))
    assert r.method == "passthrough" and r.base is None and r.files_from is None
    assert [(m.name, m.uri) for m in r.models] == [("a", "/m/a"), ("b", "/m/b")]
    assert [[(s.model, s.layers) for s in p.sources] for p in r.slices] == [
        [("a", (0, 24))],
        [("b", (20, 40))],
        [("a", (30, 40))],
    ]
    assert r.dtype == "float16"


def test_slerp_slices_name_the_base():
    cfg = {
        "merge_method": "slerp",
        "base_model": "/m/a",
        "slices": [
            {
                "sources": [
                    {"model": "/m/a", "layer_range": [0, 8]},
                    {"model": "/m/b", "layer_range": [4, 12]},
                ]
            }
        ],
        "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]},
    }
    r = parse(cfg)
    assert r.base == "/m/a" and [m.name for m in r.models] == ["b"]
    assert [(s.model, s.layers) for s in r.slices[0].sources] == [("base", (0, 8)), ("b", (4, 12))]
    assert r.params["t"] == 0.5 and r.overrides[0].params == {"t": [0.0, 1.0]}


def test_ties_slices_must_list_the_base_in_every_slice():
    cfg = {
        "merge_method": "ties",
        "base_model": "/m/base",
        "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 4]}]}],
        "parameters": {"weight": 1.0},
    }
    with pytest.raises(RecipeError, match=r"slices\[0\]: method 'ties' merges every input"):
        parse(cfg)


@pytest.mark.parametrize(
    ("cfg", "where", "message"),
    [
        (frankenmerge(merge_method="no_such"), "merge_method", "'no_such' is not supported"),
        (frankenmerge(models=[{"model": "/m/a"}]), "slices", "not both"),
        (frankenmerge(slices=[]), "slices", "non-empty list"),
        (
            frankenmerge(
                slices=[
                    {
                        "sources": [{"model": "/m/a", "layer_range": [0, 2]}],
                        "parameters": {"scale": 2},
                    },
                    {"sources": [{"model": "/m/b", "layer_range": [0, 2]}]},
                ]
            ),
            r"slices\[0\]\.parameters",
            "several slices are not supported",
        ),
        (
            frankenmerge(
                slices=[
                    {
                        "sources": [
                            {"model": "/m/a", "layer_range": [0, 2], "parameters": {"scale": 2}}
                        ]
                    }
                ]
            ),
            r"slices\[0\]\.sources\[0\]\.parameters\.scale",
            "one scale at the top level",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": "/m/a", "layer_range": [0, 1], "parameters": {"weight": 1}}
                        ]
                    },
                    {
                        "sources": [
                            {"model": "/m/a", "layer_range": [1, 2], "parameters": {"weight": 2}}
                        ]
                    },
                ],
            },
            r"slices\[1\]\.sources\[0\]\.parameters",
            r"differs from slices\[0\]",
        ),
        (
            frankenmerge(slices=[{"sources": [{"model": "/m/a", "layer_range": [0]}]}]),
            r"slices\[0\]\.sources\[0\]\.layer_range",
            "expected \\[start, end\\]",
        ),
        (frankenmerge(base_model="/m/b"), "base_model", "first slice"),
        (
            {
                "merge_method": "linear",
                "base_model": "/m/base",
                "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2]}]}],
                "parameters": {"weight": 1.0},
            },
            "base_model",
            "one of the sources",
        ),
        (
            {
                "merge_method": "passthrough",
                "models": [{"model": "/m/a", "parameters": {"scale": 2}}],
            },
            r"models\[0\]\.parameters\.scale",
            "one scale at the top level",
        ),
        (
            {"merge_method": "nearswap", "base_model": "/m/base", "models": [{"model": "/m/a"}]},
            r"parameters\.t",
            "no default",
        ),
        (
            {
                "merge_method": "arcee_fusion",
                "base_model": "/m/a",
                "models": [{"model": "/m/b"}, {"model": "/m/c"}],
            },
            "models",
            "exactly 1 model besides the base_model",
        ),
    ],
)
def test_refused_with_the_field_named(cfg, where, message):
    with pytest.raises(RecipeError, match=rf"{SOURCE}: {where}: .*{message}"):
        parse(cfg)


def test_a_slice_range_past_the_model_is_a_plan_error_not_a_parse_error():
    # the layer counts are read when the models are opened (tests/engine/test_stack.py)
    r = parse(frankenmerge())
    assert r.slices[1].sources[0].layers == (20, 40)


def test_new_methods_parameters():
    r = parse(
        {
            "merge_method": "ramplus_tl",
            "base_model": "/m/base",
            "models": [{"model": "/m/a"}, {"model": "/m/b"}],
            "parameters": {"r": 0.3, "alpha": "1e-1"},
        }
    )
    assert r.params == {"epsilon": 1e-5, "r": 0.3, "alpha": 0.1} and r.base == "/m/base"
    r = parse(
        {
            "merge_method": "nearswap",
            "base_model": "/m/base",
            "models": [{"model": "/m/a"}, {"model": "/m/base"}],
            "parameters": {"t": 0.001},
        }
    )
    assert r.params == {"t": 0.001} and [m.name for m in r.models] == ["a"]
    r = parse(
        {
            "merge_method": "arcee_fusion",
            "base_model": "/m/a",
            "models": [{"model": "/m/a"}, {"model": "/m/b"}],
        }
    )
    assert r.base == "/m/a" and [m.uri for m in r.models] == ["/m/b"] and r.params == {}


def test_one_slice_with_parameters_is_the_models_config_it_stands_for():
    # second formulation: the same merge written with models: and top-level parameters
    def model(path, span, **params):
        return {"model": path, "layer_range": span, "parameters": params}

    sliced = {
        "merge_method": "ties",
        "base_model": "/m/base",
        "slices": [
            {
                "sources": [
                    model("/m/a", [0, 4], weight=1.0, density=[0.2, 0.8]),
                    model("/m/b", [0, 4], weight=[{"filter": "mlp", "value": 0.5}, {"value": 1.0}]),
                    model("/m/base", [0, 4]),
                ],
                "parameters": {"density": [{"filter": "attn", "value": 0.3}], "normalize": False},
            }
        ],
        "parameters": {"density": 0.6, "lambda": 1.5, "normalize": True},
    }
    flat = {
        "merge_method": "ties",
        "base_model": "/m/base",
        "models": [
            {"model": "/m/a", "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
            {
                "model": "/m/b",
                "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
            },
        ],
        "parameters": {
            "density": [{"filter": "attn", "value": 0.3}, {"value": 0.6}],
            "lambda": 1.5,
            "normalize": False,
        },
    }
    a, b = parse(sliced), parse(flat)
    assert a.model_dump(exclude={"slices"}) == b.model_dump(exclude={"slices"})
    assert [(s.model, s.layers) for s in a.slices[0].sources] == [
        ("a", (0, 4)),
        ("b", (0, 4)),
        ("base", (0, 4)),
    ]


def test_a_gradient_restarts_in_every_slice_as_in_mergekit():
    # three slices of 3, 1 and 2 layers: t = k / (L - 1) inside each (1 for a one-layer slice),
    # 0 outside the layers
    cfg = frankenmerge(
        slices=[
            {"sources": [{"model": "/m/a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "/m/b", "layer_range": [5, 6]}]},
            {"sources": [{"model": "/m/a", "layer_range": [1, 3]}]},
        ],
        parameters={"scale": [0.0, 1.0]},
    )
    r = parse(cfg)
    method = get_method("passthrough")
    got = [
        resolve_params(r, method, f"model.layers.{k}.mlp.up_proj.weight", 6).shared["scale"]
        for k in range(6)
    ]
    assert got == [0.0, 0.5, 1.0, 1.0, 0.0, 1.0]
    assert resolve_params(r, method, "model.embed_tokens.weight", 6).shared["scale"] == 0.0
