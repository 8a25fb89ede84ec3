"""mergekit YAML -> amalgam recipes: per-method defaults, filters and gradients resolved exactly as
mergekit 0.1.5 resolves them, every refusal, and merged outputs equal to hand-written recipes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import RecipeError
from amalgam.mergekit_compat import METHODS, translate
from amalgam.methods.base import get_method
from amalgam.methods.params import layer_index, resolve_params
from amalgam.recipe import Recipe, load_recipe, parse_recipe

SOURCE = "cfg.yml"
NUM_LAYERS = 4
NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}"
        for i in range(NUM_LAYERS)
        for part in (
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
        )
    ),
    "model.norm.weight",
    "lm_head.weight",
]


def parse(cfg: dict[str, Any]) -> Recipe:
    return parse_recipe(cfg, SOURCE)


def ties_cfg(**extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": "/m/base",
        "models": [
            {"model": "/m/a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "/m/b", "parameters": {"weight": 0.5, "density": 0.3}},
        ],
        **extra,
    }


# -- mergekit's resolution, written from its documented behaviour, as the reference ----------


def mk_evaluate(setting: Any, name: str, t: float) -> Any:
    """mergekit's evaluate_setting: filter lists (first substring match), then gradients."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(e, dict) for e in setting):
        s = t * (len(setting) - 1)
        i = int(s)
        j = min(i + 1, len(setting) - 1)
        return (1 - (s - i)) * setting[i] + (s - i) * setting[j]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return mk_evaluate(cond["value"], name, t)
    return None


def mk_resolve(cfg: dict[str, Any], model: int, param: str, name: str, default: Any) -> Any:
    """A model's value for ``param`` on tensor ``name``: its own setting, then the top level."""
    layer = layer_index(name)
    t = 0.0 if layer is None else layer / (NUM_LAYERS - 1)
    own = cfg["models"][model].get("parameters") or {}
    for scope in (own, cfg.get("parameters") or {}):
        if param in scope:
            value = mk_evaluate(scope[param], name, t)
            if value is not None:
                return value
    return default


def amalgam_value(recipe: Recipe, model: int, param: str, name: str) -> Any:
    method = get_method(recipe.method)
    return resolve_params(recipe, method, name, NUM_LAYERS).per_model[model][param]


def assert_resolves_like_mergekit(cfg: dict[str, Any], params: dict[str, Any]) -> None:
    """``params``: mergekit parameter name -> its mergekit default."""
    recipe = parse(cfg)
    for model in range(len(cfg["models"])):
        for param, default in params.items():
            for name in NAMES:
                want = mk_resolve(cfg, model, param, name, default)
                got = amalgam_value(recipe, model, param, name)
                assert got == pytest.approx(want, abs=1e-12), (model, param, name)


# -- each method ----------------------------------------------------------------------------


def test_linear_maps_weights_and_keeps_normalize_default():
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": "/m/a", "parameters": {"weight": 0.7}},
            {"model": "/m/b", "parameters": {"weight": 0.3}},
        ],
        "dtype": "bfloat16",
    }
    r = parse(cfg)
    assert r.method == "linear" and r.base is None
    assert [(m.uri, m.name, m.params) for m in r.models] == [
        ("/m/a", "a", {"weight": 0.7}),
        ("/m/b", "b", {"weight": 0.3}),
    ]
    assert r.params == {"normalize": True}
    assert r.overrides == [] and r.dtype == "bfloat16" and r.files_from is None


def test_linear_merges_an_unlisted_base_model_like_any_input():
    # mergekit 0.1.5 appends an unlisted base_model to linear's inputs, with top-level values.
    cfg = {
        "merge_method": "linear",
        "base_model": "/m/base",
        "models": [{"model": "/m/a", "parameters": {"weight": 2}}, {"model": "/m/b"}],
        "parameters": {"weight": 1, "normalize": False},
    }
    r = parse(cfg)
    assert r.base is None
    assert [(m.name, m.params) for m in r.models] == [
        ("a", {"weight": 2.0}),
        ("b", {}),
        ("base-2", {}),
    ]
    assert r.params == {"normalize": False, "weight": 1.0}
    assert r.files_from == "base-2"  # mergekit copies config and tokenizer from the base


def test_task_arithmetic_drops_parameters_without_effect():
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "/m/base",
        "models": [
            {"model": "/m/base"},
            {"model": "/m/a", "parameters": {"weight": 0.5, "density": 0.3}},
            {"model": "/m/b", "parameters": {"weight": -0.5}},
        ],
        "parameters": {"lambda": 0.8, "int8_mask": True, "rescale": True, "normalize": True},
    }
    r = parse(cfg)
    assert r.base == "/m/base" and r.files_from == "base"
    assert [(m.name, m.params) for m in r.models] == [
        ("a", {"weight": 0.5}),
        ("b", {"weight": -0.5}),
    ]
    assert r.params == {"normalize": True, "lambda": 0.8}


def test_ties_density_defaults_to_mergekit_one_and_consensus_sum():
    cfg = ties_cfg()
    del cfg["models"][1]["parameters"]["density"]
    r = parse(cfg)
    assert r.params == {"consensus": "sum", "normalize": True, "lambda": 1.0, "density": 1.0}
    assert [m.params for m in r.models] == [{"weight": 1.0, "density": 0.5}, {"weight": 0.5}]


@pytest.mark.parametrize(
    ("method", "rescale", "want"),
    [
        ("dare_ties", None, "l1"),
        ("dare_ties", False, "none"),
        ("dare_linear", None, "l1"),
        ("dare_linear", True, "l1"),
    ],
)
def test_dare_rescale_is_l1_norm_matching(method, rescale, want):
    cfg = ties_cfg(merge_method=method)
    if rescale is not None:
        cfg["parameters"] = {"rescale": rescale}
    r = parse(cfg)
    assert r.params["rescale"] == want
    assert r.params["normalize"] is False and r.params["density"] == 1.0
    assert ("consensus" in r.params) == (method == "dare_ties")


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_defaults(method):
    cfg = ties_cfg(merge_method=method, parameters={"gamma": 0.02})
    r = parse(cfg)
    assert r.params["gamma"] == 0.02 and r.params["normalize"] is False
    assert r.params["density"] == 1.0  # every model sets its own below
    assert [m.params["density"] for m in r.models] == [0.5, 0.3]
    assert ("consensus" in r.params) == (method == "breadcrumbs_ties")


def test_breadcrumbs_without_density_is_task_arithmetic():
    # mergekit's default density 1 skips the outlier cut: amalgam gets density 1, gamma 0.
    cfg = ties_cfg(merge_method="breadcrumbs", parameters={"gamma": 0.05})
    for m in cfg["models"]:
        del m["parameters"]["density"]
    r = parse(cfg)
    assert r.params["density"] == 1.0 and r.params["gamma"] == 0.0
    assert all("gamma" not in m.params for m in r.models)


def test_slerp_takes_base_and_one_model_with_t_filters():
    cfg = {
        "merge_method": "slerp",
        "base_model": "/m/base",
        "models": [{"model": "/m/base"}, {"model": "/m/a"}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "bfloat16",
    }
    r = parse(cfg)
    assert r.base == "/m/base" and [m.name for m in r.models] == ["a"]
    assert r.params == {"t": 0.5}
    assert [(o.match, o.params) for o in r.overrides] == [
        ("mlp", {"t": [1.0, 0.5, 0.7, 0.3, 0.0]}),
        ("self_attn", {"t": [0.0, 0.5, 0.3, 0.7, 1.0]}),
    ]
    method = get_method("slerp")
    for name in NAMES:
        layer = layer_index(name)
        t = 0.0 if layer is None else layer / (NUM_LAYERS - 1)
        want = mk_evaluate(cfg["parameters"]["t"], name, t)
        got = resolve_params(r, method, name, NUM_LAYERS).shared["t"]
        assert got == pytest.approx(want), name


def test_model_stock():
    cfg = {
        "merge_method": "model_stock",
        "base_model": "/m/base",
        "models": [{"model": "/m/a"}, {"model": "/m/b"}, {"model": "/m/base"}],
        "parameters": {"filter_wise": True},
    }
    r = parse(cfg)
    assert r.params == {"filter_wise": True} and [m.name for m in r.models] == ["a", "b"]


def test_every_supported_method_parses():
    assert set(METHODS) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "slerp",
        "model_stock",
        "della",
        "della_linear",
        "sce",
        "nuslerp",
        "multislerp",
        "karcher",
        "passthrough",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    }
    # parsed in tests/test_mergekit_compat_della_sce_slerp.py and tests/test_mergekit_slices.py
    shaped_otherwise = ("slerp", "model_stock", "linear", "sce", "nuslerp", "multislerp")
    for name in METHODS:
        if name in (*shaped_otherwise, "karcher", "passthrough", "nearswap", "arcee_fusion"):
            continue
        if name.startswith("ram"):
            parse({"merge_method": name, "base_model": "/m/base", "models": [{"model": "/m/a"}]})
            continue
        parse(ties_cfg(merge_method=name))


# -- values, names, dtype, files ------------------------------------------------------------


def test_values_coerced_as_mergekit_does():
    # YAML 1.1 reads 1e-3 as a string; mergekit's pydantic parses it as a number.
    cfg = yaml.safe_load(
        """
merge_method: ties
base_model: /m/base
models:
  - model: /m/a
    parameters: {weight: 1e-3, density: 1}
parameters: {normalize: "false", lambda: 2}
dtype: torch.bfloat16
"""
    )
    r = parse(cfg)
    assert r.models[0].params == {"weight": 0.001, "density": 1.0}
    assert r.params["normalize"] is False and r.params["lambda"] == 2.0
    assert r.dtype == "bfloat16"


def test_out_dtype_wins_over_dtype():
    r = parse(ties_cfg(dtype="float32", out_dtype="float16"))
    assert r.dtype == "float16"


def test_labels_are_safe_distinct_and_never_base():
    cfg = ties_cfg()
    cfg["models"] = [
        {"model": "/x/base", "parameters": {"weight": 1}},
        {"model": "/y/base", "parameters": {"weight": 1}},
        {"model": "s3://bucket/My Model (v2)/", "parameters": {"weight": 1}},
        {"model": "/z/My Model (v2)", "parameters": {"weight": 1}},
    ]
    r = parse(cfg)
    assert [m.name for m in r.models] == ["base-2", "base-3", "My-Model-v2", "My-Model-v2-2"]
    assert r.models[2].uri == "s3://bucket/My Model (v2)/"


def test_base_listed_with_parameters_is_dropped_for_base_methods():
    cfg = ties_cfg()
    cfg["models"].insert(0, {"model": "/m/base", "parameters": {"weight": 3, "density": 0.1}})
    r = parse(cfg)
    assert [m.name for m in r.models] == ["a", "b"]


def test_tokenizer_source_base_is_accepted():
    r = parse(ties_cfg(tokenizer_source="base"))
    assert r.files_from == "base"
    assert r.align.method == "vocab" and r.align.tokenizer.source == "base"


def test_load_recipe_detects_a_mergekit_file(tmp_path):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(ties_cfg()))
    r = load_recipe(path)
    assert r.method == "ties" and r.base == "/m/base"
    path.write_text(yaml.safe_dump(ties_cfg(slices=[])))
    with pytest.raises(RecipeError, match=rf"{path}: slices"):
        load_recipe(path)


# -- filters and gradients ------------------------------------------------------------------


def test_filters_become_escaped_overrides_in_reverse_order():
    cfg = ties_cfg(
        parameters={
            "weight": [
                {"filter": "self_attn", "value": [0.1, 0.9]},
                {"filter": "layers.1.", "value": 0.3},
                {"value": 0.5},
                {"filter": "mlp", "value": 7.0},  # after the fallback: never read
            ]
        }
    )
    for m in cfg["models"]:
        del m["parameters"]["weight"]
    r = parse(cfg)
    assert r.params["weight"] == 0.5
    assert [(o.match, o.params) for o in r.overrides] == [
        (r"layers\.1\.", {"weight": 0.3}),
        ("self_attn", {"weight": [0.1, 0.9]}),
    ]
    assert_resolves_like_mergekit(cfg, {"weight": None, "density": 1.0})


def test_a_models_own_value_beats_top_level_filters():
    cfg = ties_cfg(
        parameters={"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.4}]},
    )
    cfg["models"][0]["parameters"] = {
        "weight": [{"filter": "q_proj", "value": 0.9}, {"value": 0.6}],
        "density": [0.1, 0.9],
    }
    cfg["models"][1]["parameters"] = {
        "density": [{"filter": "norm", "value": 0.7}],  # no fallback: top level, then default
        "weight": [{"filter": "down_proj", "value": [1, 2, 3]}],
    }
    r = parse(cfg)
    assert r.models[0].params == {"density": [0.1, 0.9]}
    assert [(o.match, o.params, o.models) for o in r.overrides] == [
        ("mlp", {"weight": 0.2}, {}),
        ("", {}, {"a": {"weight": 0.6}}),
        ("q_proj", {}, {"a": {"weight": 0.9}}),
        ("down_proj", {}, {"b": {"weight": [1.0, 2.0, 3.0]}}),
        ("norm", {}, {"b": {"density": 0.7}}),
    ]
    assert_resolves_like_mergekit(cfg, {"weight": None, "density": 1.0})


FILTERS = ["self_attn", "mlp", "q_proj", "layers.1.", "layers.2.mlp", "norm", "embed", "*"]


def random_setting(rng: random.Random, fallback: bool) -> Any:
    def value() -> Any:
        if rng.random() < 0.4:
            return [round(rng.uniform(0.1, 1), 2) for _ in range(rng.randint(1, 4))]
        return round(rng.uniform(0.1, 1), 2)

    kind = rng.random()
    if kind < 0.3:
        return value()
    entries = [{"filter": rng.choice(FILTERS), "value": value()} for _ in range(rng.randint(1, 4))]
    if fallback or rng.random() < 0.5:
        entries.append({"value": value()})
    return entries if kind < 0.9 else entries[-1]  # a single mapping, not a list


@pytest.mark.parametrize("seed", range(40))
def test_random_filter_and_gradient_settings_resolve_like_mergekit(seed):
    rng = random.Random(seed)
    cfg: dict[str, Any] = {
        "merge_method": "dare_ties",
        "base_model": "/m/base",
        "models": [{"model": f"/m/e{i}", "parameters": {}} for i in range(3)],
        "parameters": {"weight": random_setting(rng, fallback=True)},
    }
    if rng.random() < 0.7:
        cfg["parameters"]["density"] = random_setting(rng, fallback=False)
    for m in cfg["models"]:
        for param in ("weight", "density"):
            if rng.random() < 0.6:
                m["parameters"][param] = random_setting(rng, fallback=False)
    assert_resolves_like_mergekit(cfg, {"weight": None, "density": 1.0})


# -- refusals -------------------------------------------------------------------------------


def with_(path: str, value: Any) -> Any:
    """A change to ties_cfg(): set the value at a dotted path (models.N.x.y)."""

    def apply(cfg: dict[str, Any]) -> None:
        keys = path.split(".")
        node: Any = cfg
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value

    return apply


def drop(path: str) -> Any:
    def apply(cfg: dict[str, Any]) -> None:
        keys = path.split(".")
        node: Any = cfg
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[keys[-1]]

    return apply


REFUSALS = [
    (with_("slices", [{"sources": []}]), "slices", "slices"),
    (with_("modules", {}), "modules", "per-module"),
    (with_("tokenizer", {"strip": True}), "tokenizer.strip", "not supported"),
    (with_("name", "my-merge"), "name", "unknown"),
    (with_("merge_method", "mystery"), "merge_method", "'mystery' is not supported"),
    (with_("merge_method", None), "merge_method", "None is not supported"),
    (drop("base_model"), "base_model", "needs a base_model"),
    (with_("models", []), "models", "non-empty list"),
    (with_("models.0.layer_range", [0, 2]), "models[0].layer_range", "unknown key"),
    (with_("models.0", "/m/a"), "models[0]", "expected a mapping"),
    (with_("models.0.model", "org/model@main"), "models[0].model", "revision"),
    (with_("models.0.model", {"model": "/m/a", "lora": "/m/l"}), "models[0].model", "structured"),
    (with_("models.0.model", ""), "models[0].model", "expected a model path"),
    (with_("models.1.model", "/m/a"), "models[1].model", "listed twice"),
    (with_("models.0.parameters", [1]), "models[0].parameters", "mapping"),
    (with_("parameters", [1]), "parameters", "mapping"),
    (with_("parameters.epsilon", 0.1), "parameters.epsilon", "unknown parameter"),
    (with_("models.1.parameters.foo", 1), "models[1].parameters.foo", "unknown parameter"),
    (with_("models.0.parameters.lambda", 2), "models[0].parameters.lambda", "shared parameter"),
    (drop("models.1.parameters.weight"), "models[1].parameters.weight", "no default"),
    (
        with_("models.1.parameters.weight", [{"filter": "mlp", "value": 1}]),
        "models[1].parameters.weight",
        "no default",
    ),
    (with_("models.0.parameters.weight", "abc"), "models[0].parameters.weight", "a number"),
    (with_("models.0.parameters.weight", True), "models[0].parameters.weight", "a number"),
    (with_("models.0.parameters.weight", []), "models[0].parameters.weight", "empty list"),
    (with_("parameters.normalize", [True, False]), "parameters.normalize", "gradient"),
    (with_("parameters.normalize", "maybe"), "parameters.normalize", "true/false"),
    (with_("parameters.rescale", True), "parameters.rescale", "not supported"),
    (
        with_("parameters.weight", [{"filter": "mlp"}]),
        "parameters.weight[0]",
        "needs a 'value'",
    ),
    (
        with_("parameters.weight", [{"filter": "mlp", "value": 1, "x": 2}]),
        "parameters.weight[0].x",
        "unknown key",
    ),
    (
        with_("parameters.weight", [{"filter": 3, "value": 1}]),
        "parameters.weight[0].filter",
        "a string",
    ),
    (with_("dtype", "float64"), "dtype", "not supported"),
    (with_("out_dtype", "int8"), "out_dtype", "not supported"),
    (with_("tokenizer_source", "/m/zzz"), "tokenizer_source", "one of the models"),
    (with_("chat_template", "chatml"), "chat_template", "not supported"),
    # amalgam's own validation, reported with the source too (density must be in (0, 1])
    (with_("models.0.parameters.density", 0.0), "density", "must be in"),
]


@pytest.mark.parametrize(("change", "field", "message"), REFUSALS)
def test_refused_with_field_and_source(change, field, message):
    cfg = ties_cfg()
    change(cfg)
    with pytest.raises(RecipeError) as err:
        parse(cfg)
    text = str(err.value)
    assert text.startswith(f"{SOURCE}: "), text
    assert field in text and message in text, text


@pytest.mark.parametrize(
    ("cfg", "field", "message"),
    [
        (
            {
                "merge_method": "slerp",
                "base_model": "/m/base",
                "models": [{"model": "/m/a"}],
            },
            "parameters.t",
            "no default",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "/m/base",
                "models": [{"model": "/m/a"}, {"model": "/m/b"}],
                "parameters": {"t": 0.5},
            },
            "models",
            "exactly 1 model besides the base_model",
        ),
        (
            {
                "merge_method": "model_stock",
                "base_model": "/m/base",
                "models": [{"model": "/m/base"}, {"model": "/m/a"}],
            },
            "models",
            "at least 2",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "/m/a"}, {"model": "/m/b"}]},
            "models[0].parameters.weight",
            "no default",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "/m/a"}],
                "parameters": {"weight": 1, "lambda": 2},
            },
            "parameters.lambda",
            "unknown parameter",
        ),
    ],
)
def test_method_specific_refusals(cfg, field, message):
    with pytest.raises(RecipeError) as err:
        parse(cfg)
    text = str(err.value)
    assert text.startswith(f"{SOURCE}: ") and field in text and message in text, text


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"models.0.parameters.density": 1.0}, "density"),
        ({"models.0.parameters.density": 0.9, "parameters.gamma": 0.2}, "gamma"),
        ({"models.0.parameters.density": 0.995}, "gamma"),  # + mergekit's default gamma 0.01
    ],
)
def test_breadcrumbs_density_mergekit_cannot_match(params, field):
    cfg = ties_cfg(merge_method="breadcrumbs")
    for path, value in params.items():
        with_(path, value)(cfg)
    with pytest.raises(RecipeError, match=field):
        parse(cfg)


def test_breadcrumbs_density_missing_for_one_model_is_refused():
    cfg = ties_cfg(merge_method="breadcrumbs")
    del cfg["models"][1]["parameters"]["density"]
    with pytest.raises(RecipeError, match=r"models\[1\]\.parameters\.density"):
        parse(cfg)


def test_translate_leaves_its_input_alone():
    cfg = ties_cfg(parameters={"weight": [{"filter": "mlp", "value": 1}, {"value": 2}]})
    before = json.dumps(cfg, sort_keys=True)
    translate(cfg, SOURCE)
    assert json.dumps(cfg, sort_keys=True) == before


# -- equivalence: merged outputs --------------------------------------------------------------


def llama_family(root: Path) -> dict[str, Path]:
    """A bf16 Llama-named base and three fine-tune-like experts (base + small deltas)."""
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (32, 16),
        "model.norm.weight": (16,),
        "lm_head.weight": (32, 16),
    }
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (16, 16),
            p + "self_attn.o_proj.weight": (16, 16),
            p + "mlp.up_proj.weight": (24, 16),
            p + "mlp.down_proj.weight": (16, 24),
            p + "input_layernorm.weight": (16,),
        }
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": NUM_LAYERS,
        "hidden_size": 16,
        "torch_dtype": "bfloat16",
    }
    paths = {}
    for name, scale in [("base", 0.0), ("e0", 2e-3), ("e1", 2e-3), ("e2", 2e-3)]:
        folder = root / name
        folder.mkdir()
        tensors = {
            k: (v + scale * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
            for k, v in base.items()
        }
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        paths[name] = folder
    return paths


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return llama_family(tmp_path_factory.mktemp("family"))


def merged(recipe: Recipe, out: Path) -> dict[str, torch.Tensor]:
    run_merge(recipe, MergeOptions(output=str(out), device="cpu"))
    files = sorted(out.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors |= load_file(str(f))
    return tensors


def assert_same_output(mk_cfg: dict[str, Any], hand: dict[str, Any], tmp_path: Path) -> None:
    got = merged(parse(mk_cfg), tmp_path / "from-mergekit")
    want = merged(parse_recipe(hand, "hand.yml"), tmp_path / "by-hand")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    first = load_file(str(Path(hand["models"][0]["uri"]) / "model.safetensors"))
    assert any(not torch.equal(want[n], first[n]) for n in want)  # the merge did something


def test_ties_with_filters_and_gradients_equals_hand_recipe(family, tmp_path):
    p = {k: str(v) for k, v in family.items()}
    mk_cfg = {
        "merge_method": "ties",
        "base_model": p["base"],
        "models": [
            {"model": p["base"]},
            {"model": p["e0"], "parameters": {"density": [0.2, 0.8], "weight": 1.0}},
            {
                "model": p["e1"],
                "parameters": {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.7}]},
            },
            {"model": p["e2"], "parameters": {"density": 0.4}},
        ],
        "parameters": {
            "weight": [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.5}],
            "lambda": 1.2,
        },
        "dtype": "bfloat16",
    }
    hand = {
        "method": "ties",
        "base": p["base"],
        "models": [
            {"uri": p["e0"], "params": {"density": [0.2, 0.8]}},
            {"uri": p["e1"], "params": {"density": 0.5}},
            {"uri": p["e2"], "params": {"density": 0.4}},
        ],
        "params": {"weight": 0.5, "lambda": 1.2},
        "overrides": [
            {"match": "self_attn", "params": {"weight": [0.2, 1.0]}},
            {"match": ".*", "models": {"e0": {"weight": 1.0}}},
            {"match": "mlp", "models": {"e1": {"weight": 0.7}}},
        ],
        "dtype": "bfloat16",
    }
    assert_same_output(mk_cfg, hand, tmp_path)


def test_dare_ties_equals_hand_recipe_with_l1_rescale(family, tmp_path):
    p = {k: str(v) for k, v in family.items()}
    mk_cfg = {
        "merge_method": "dare_ties",
        "base_model": p["base"],
        "models": [{"model": p[e]} for e in ("e0", "e1", "e2")],
        "parameters": {"weight": 1.0, "density": 0.3},
    }
    hand = {
        "method": "dare_ties",
        "base": p["base"],
        "models": [{"uri": p[e]} for e in ("e0", "e1", "e2")],
        "params": {"density": 0.3, "rescale": "l1"},
    }
    assert_same_output(mk_cfg, hand, tmp_path)


def test_linear_with_base_model_equals_hand_recipe(family, tmp_path):
    p = {k: str(v) for k, v in family.items()}
    mk_cfg = {
        "merge_method": "linear",
        "base_model": p["base"],
        "models": [{"model": p["e0"], "parameters": {"weight": 3}}, {"model": p["e1"]}],
        "parameters": {"weight": 1},
    }
    hand = {
        "method": "linear",
        "models": [
            {"uri": p["e0"], "params": {"weight": 3}},
            {"uri": p["e1"]},
            {"uri": p["base"]},
        ],
        "files_from": "base",
    }
    assert_same_output(mk_cfg, hand, tmp_path)


def test_slerp_with_t_filters_equals_hand_recipe(family, tmp_path):
    p = {k: str(v) for k, v in family.items()}
    mk_cfg = {
        "merge_method": "slerp",
        "base_model": p["base"],
        "models": [{"model": p["base"]}, {"model": p["e0"]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0]},
                {"value": 0.3},
            ]
        },
    }
    hand = {
        "method": "slerp",
        "base": p["base"],
        "models": [{"uri": p["e0"]}],
        "params": {"t": 0.3},
        "overrides": [
            {"match": "mlp", "params": {"t": [1, 0.5, 0]}},
            {"match": "self_attn", "params": {"t": [0, 0.5, 1]}},
        ],
    }
    assert_same_output(mk_cfg, hand, tmp_path)


def test_breadcrumbs_without_density_equals_task_arithmetic(family, tmp_path):
    p = {k: str(v) for k, v in family.items()}
    mk_cfg = {
        "merge_method": "breadcrumbs",
        "base_model": p["base"],
        "models": [{"model": p[e]} for e in ("e0", "e1", "e2")],
        "parameters": {"weight": 0.4, "gamma": 0.1},
    }
    hand = {
        "method": "task_arithmetic",
        "base": p["base"],
        "models": [{"uri": p[e]} for e in ("e0", "e1", "e2")],
        "params": {"weight": 0.4},
    }
    assert_same_output(mk_cfg, hand, tmp_path)
