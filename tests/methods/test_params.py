"""Parameter resolution: precedence, overrides by regex, layer gradients (as mergekit), errors."""

from __future__ import annotations

import numpy as np
import pytest

from amalgam.errors import RecipeError
from amalgam.methods.base import get_method
from amalgam.methods.params import interpolate, layer_index, resolve_params
from amalgam.recipe import parse_recipe


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.7.mlp.down_proj.weight", 7),
        ("model.layers.12", 12),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("bert.encoder.layer.11.output.dense.bias", 11),
        ("blocks.0.norm1.weight", 0),
        ("vision.block.25.attn.qkv.weight", 25),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
        ("model.mylayers.3.weight", None),  # "layers" must be a whole name segment
        ("model.layers.x.weight", None),
    ],
)
def test_layer_index(name, expected):
    assert layer_index(name) == expected


def test_interpolate_by_hand():
    # [0, 1] over 5 layers: layer 2 -> x = 2/4 = 0.5 -> 0.5
    assert interpolate([0.0, 1.0], 2, 5) == 0.5
    # [0.2, 0.9, 0.4] over 7 layers: layer 3 -> x = 0.5 -> s = 1 -> 0.9
    assert interpolate([0.2, 0.9, 0.4], 3, 7) == pytest.approx(0.9)
    # layer 1 -> x = 1/6 -> s = 1/3 -> 0.2 + (0.9 - 0.2) / 3
    assert interpolate([0.2, 0.9, 0.4], 1, 7) == pytest.approx(0.2 + 0.7 / 3)
    # last layer -> x = 1 -> the last value
    assert interpolate([0.2, 0.9, 0.4], 6, 7) == pytest.approx(0.4)
    # no layer index (embeddings, final norm, head) -> x = 0 -> the first value
    assert interpolate([0.2, 0.9, 0.4], None, 7) == pytest.approx(0.2)
    # a one-layer model: x = 1 (mergekit's rule for L = 1)
    assert interpolate([0.2, 0.9, 0.4], 0, 1) == pytest.approx(0.4)
    # a one-element list is that value; a scalar is unchanged
    assert interpolate([0.3], 4, 10) == 0.3
    assert interpolate(0.7, 4, 10) == 0.7
    assert interpolate("sum", 4, 10) == "sum"


@pytest.mark.parametrize("values", [[0.0, 1.0], [0.2, 0.9, 0.4], [1.0, -2.0, 0.5, 3.0, 0.0]])
@pytest.mark.parametrize("num_layers", [2, 5, 13, 32])
def test_interpolate_matches_np_interp(values, num_layers):
    knots = np.linspace(0.0, 1.0, len(values))
    for layer in range(num_layers):
        expected = float(np.interp(layer / (num_layers - 1), knots, values))
        assert interpolate(values, layer, num_layers) == pytest.approx(expected, abs=1e-12)


def recipe(**extra):
    data = {
        "method": "ties",
        "base": "base",
        "models": [
            {"uri": "a", "params": {"density": 0.6}},
            {"uri": "b"},
        ],
    }
    data.update(extra)
    return parse_recipe(data)


def resolved(r, name, num_layers=4, use_overrides=True):
    return resolve_params(r, get_method(r.method), name, num_layers, use_overrides)


def test_defaults_fill_every_parameter():
    p = resolved(parse_recipe({"method": "ties", "base": "x", "models": [{"uri": "a"}]}), "w")
    spec = get_method("ties")
    assert p.shared == {q.name: q.default for q in spec.params}
    assert p.per_model == (p.shared,)
    assert p.shared["density"] == 0.2 and p.shared["normalize"] is True


def test_precedence_chain():
    r = recipe(
        params={"density": 0.5, "lambda": 2.0},
        overrides=[
            {"match": r"mlp", "params": {"density": 0.7, "lambda": 3.0}},
            {"match": r"mlp", "models": {"b": {"density": 0.8}}},
        ],
    )
    # default (0.2) < params (0.5) < model params (a: 0.6)
    p = resolved(r, "model.layers.0.self_attn.q_proj.weight")
    assert p.each("density") == [0.6, 0.5]
    assert p.shared["lambda"] == 2.0
    assert p.each("weight") == [1.0, 1.0]  # default
    # < override params (0.7 for both, beating a's own 0.6) < override per-model (b: 0.8)
    p = resolved(r, "model.layers.0.mlp.up_proj.weight")
    assert p.each("density") == [0.7, 0.8]
    assert p.shared["lambda"] == 3.0
    # overrides can be switched off
    p = resolved(r, "model.layers.0.mlp.up_proj.weight", use_overrides=False)
    assert p.each("density") == [0.6, 0.5]


def test_later_overrides_win():
    r = recipe(
        overrides=[
            {"match": r"mlp", "models": {"a": {"density": 0.3}}, "params": {"weight": 2.0}},
            {"match": r"layers\.1\.", "params": {"density": 0.4}},
        ]
    )
    # both match: the later shared value beats the earlier per-model one
    p = resolved(r, "model.layers.1.mlp.up_proj.weight")
    assert p.each("density") == [0.4, 0.4]
    assert p.each("weight") == [2.0, 2.0]
    # only the first matches
    p = resolved(r, "model.layers.2.mlp.up_proj.weight")
    assert p.each("density") == [0.3, 0.2]
    # match is re.search, not a full match
    p = resolved(r, "prefix.layers.1.suffix")
    assert p.each("density") == [0.4, 0.4]


def test_name_none_ignores_overrides_and_takes_first_gradient_value():
    r = recipe(
        params={"lambda": [0.5, 1.5]},
        overrides=[{"match": ".*", "params": {"density": 0.9}}],
    )
    p = resolved(r, None)
    assert p.each("density") == [0.6, 0.2]
    assert p.shared["lambda"] == 0.5


def test_gradients_in_every_place_follow_the_layer():
    r = recipe(
        params={"lambda": [0.0, 3.0]},
        models=[{"uri": "a", "params": {"weight": [1.0, 0.0]}}, {"uri": "b"}],
        overrides=[{"match": "mlp", "models": {"b": {"density": [0.1, 0.4, 0.1]}}}],
    )
    for layer in range(4):
        x = layer / 3
        p = resolved(r, f"model.layers.{layer}.mlp.gate_proj.weight", num_layers=4)
        assert p.shared["lambda"] == pytest.approx(3.0 * x)
        assert p.each("weight") == pytest.approx([1.0 - x, 1.0])
        expected = float(np.interp(x, [0.0, 0.5, 1.0], [0.1, 0.4, 0.1]))
        assert p.each("density") == pytest.approx([0.2, expected])
    # the embeddings take the first value of every gradient
    p = resolved(r, "model.embed_tokens.weight", num_layers=4)
    assert p.shared["lambda"] == 0.0
    assert p.each("weight") == [1.0, 1.0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"models": [{"uri": "a", "params": {"lambda": 2.0}}]}, "shared parameter"),
        (
            {"overrides": [{"match": "x", "models": {"a": {"normalize": False}}}]},
            "shared parameter",
        ),
        ({"overrides": [{"match": "x", "models": {"zz": {"density": 0.5}}}]}, "no model named"),
        ({"params": {"densty": 0.5}}, "unknown parameter"),
        ({"params": {"normalize": [True, False]}}, "list value is not allowed"),
        ({"params": {"consensus": "median"}}, "expected one of"),
        ({"params": {"density": 0.0}}, r"params\.density: .*got 0\.0"),
        ({"params": {"density": 1.5}}, r"params\.density: .*got 1\.5"),
        ({"params": {"density": [0.5, 1.5]}}, r"params\.density: .*got 1\.5"),
        ({"params": {"lambda": True}}, "expected a number"),
        ({"params": {"lambda": float("nan")}}, "must be finite"),
        ({"overrides": [{"match": "(", "params": {}}]}, "invalid regex"),
    ],
)
def test_invalid_values_are_recipe_errors(changes, message):
    data = {"method": "ties", "base": "base", "models": [{"uri": "a"}]}
    data.update(changes)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_per_model_parameter_may_be_set_for_all_models():
    # a per-model parameter in the shared params is every model's default
    p = resolved(recipe(params={"weight": 0.5}), "w")
    assert p.each("weight") == [0.5, 0.5]
