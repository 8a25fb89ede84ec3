"""Whole merges through run_merge on tiny safetensors models, checked against naive math."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.methods.base import MergeContext, get_method
from amalgam.methods.params import resolve_params
from amalgam.recipe import parse_recipe

from .naive import disjoint_merge, flat, floor_count, kth_largest_by_sort, slerp

FLOAT_SHAPES = {
    "lm_head.weight": (3, 4),
    "model.embed_tokens.weight": (6, 4),
    "model.layers.0.mlp.weight": (5, 3),
    "model.layers.0.norm.weight": (5,),
    "model.layers.1.mlp.weight": (5, 3),
    "model.layers.1.norm.weight": (5,),
}


def non_float() -> dict[str, torch.Tensor]:
    return {
        "model.position_ids": torch.arange(9, dtype=torch.int64).reshape(1, 9),
        "model.mask": torch.tensor([True, False, True]),
        "model.codes": torch.tensor([[3, 250], [7, 1]], dtype=torch.uint8),
    }


def write(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> str:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def bf16_family(tmp_path: Path, n_models: int, seed: int, extra: dict | None = None):
    """A bf16 base and fine-tunes (base + small noise, rounded to bf16), plus int buffers."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in FLOAT_SHAPES.items()}
    models = [
        {
            k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).bfloat16()
            for k, v in base.items()
        }
        for _ in range(n_models)
    ]
    base_uri = write(tmp_path / "base", {**base, **non_float(), **(extra or {})})
    uris = [write(tmp_path / f"m{i}", {**m, **non_float()}) for i, m in enumerate(models)]
    return base, models, base_uri, uris


def merged(recipe_data: dict, tmp_path: Path, out: str = "out") -> dict[str, torch.Tensor]:
    recipe = parse_recipe({**recipe_data, "output": str(tmp_path / out)})
    run_merge(recipe, MergeOptions(device="cpu"))
    return load_file(str(tmp_path / out / "model.safetensors"))


def test_ties_model_trim_is_a_global_top_k(tmp_path):
    base, models, base_uri, uris = bf16_family(tmp_path, 3, seed=0)
    densities, weights = [0.2, 0.3, 0.1], [1.0, 0.5, 2.0]
    data = {
        "method": "ties",
        "base": base_uri,
        "models": [
            {"uri": u, "params": {"density": d, "weight": w}}
            for u, d, w in zip(uris, densities, weights, strict=True)
        ],
        "params": {"trim": "model", "lambda": 1.5},
        "dtype": "float32",
    }
    out = merged(data, tmp_path)

    # Naive: one flat task vector per model over all float tensors (any fixed order), a global
    # top-k by full sort (ties with the k-th largest kept), then the per-entry vote loop.
    names = sorted(FLOAT_SHAPES)
    b = [v for n in names for v in flat(base[n].float())]
    trimmed = []
    for m, d in zip(models, densities, strict=True):
        delta = [
            x - y for x, y in zip([v for n in names for v in flat(m[n].float())], b, strict=True)
        ]
        k = floor_count(len(delta), d)
        threshold = kth_largest_by_sort([abs(v) for v in delta], k)
        trimmed.append([v if abs(v) >= threshold else 0.0 for v in delta])
    mixed = disjoint_merge(trimmed, weights, "sum", normalize=True)
    expected_flat = [y + 1.5 * v for y, v in zip(b, mixed, strict=True)]
    at = 0
    for n in names:
        size = math.prod(FLOAT_SHAPES[n])
        expected = torch.tensor(expected_flat[at : at + size], dtype=torch.float64)
        at += size
        assert out[n].dtype == torch.float32
        torch.testing.assert_close(
            out[n].double(), expected.reshape(FLOAT_SHAPES[n]), rtol=1e-6, atol=1e-6
        )
    for n, t in non_float().items():
        assert out[n].dtype == t.dtype and torch.equal(out[n], t)

    # The whole-model threshold matters: trimming each tensor on its own gives another model.
    per_tensor = merged({**data, "params": {"trim": "tensor", "lambda": 1.5}}, tmp_path, "out2")
    assert any(not torch.equal(per_tensor[n], out[n]) for n in names)


def test_bf16_inputs_are_accumulated_in_float32(tmp_path):
    # base 1.0 and two models one bf16 step above (1 + 2^-7), weights 0.375 each:
    # float32: 1 + 0.375 * 2^-7 + 0.375 * 2^-7 = 1 + 0.75 * 2^-7 -> bf16 rounds up to 1 + 2^-7.
    # (Adding each term in bf16 would round 1 + 0.375 ulp back to 1.0 twice.)
    one = torch.ones(4, dtype=torch.bfloat16)
    up = torch.full((4,), 1 + 2**-7, dtype=torch.bfloat16)
    base_uri = write(tmp_path / "base", {"w": one})
    uris = [write(tmp_path / f"m{i}", {"w": up}) for i in range(2)]
    out = merged(
        {
            "method": "task_arithmetic",
            "base": base_uri,
            "models": [{"uri": u, "params": {"weight": 0.375}} for u in uris],
        },
        tmp_path,
    )
    assert out["w"].dtype == torch.bfloat16  # the inputs' dtype by default
    assert torch.equal(out["w"], up)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [(None, torch.bfloat16), ("float16", torch.float16)]
)
def test_output_dtype_and_values(tmp_path, dtype, torch_dtype):
    base, models, base_uri, uris = bf16_family(tmp_path, 2, seed=1)
    data = {
        "method": "task_arithmetic",
        "base": base_uri,
        "models": [
            {"uri": u, "params": {"weight": w}} for u, w in zip(uris, [0.5, 0.25], strict=True)
        ],
        "params": {"lambda": 0.8},
    }
    if dtype:
        data["dtype"] = dtype
    out = merged(data, tmp_path)
    for n in FLOAT_SHAPES:
        b = flat(base[n])
        mixed = [
            y + 0.8 * (0.5 * (p - y) + 0.25 * (q - y))
            for y, p, q in zip(b, flat(models[0][n]), flat(models[1][n]), strict=True)
        ]
        exact = torch.tensor(mixed, dtype=torch.float64).reshape(FLOAT_SHAPES[n])
        assert out[n].dtype == torch_dtype
        # one rounding of the float32 result: within half an ulp, i.e. 2^-8 (bf16) or 2^-11
        # (fp16) relative, plus float32's own rounding
        rel = 2.0**-8 if torch_dtype == torch.bfloat16 else 2.0**-11
        torch.testing.assert_close(out[n].double(), exact, rtol=rel + 1e-6, atol=1e-7)
    for n, t in non_float().items():
        assert torch.equal(out[n], t)


def test_non_float_tensors_come_from_the_first_model_without_base(tmp_path):
    g = torch.Generator().manual_seed(2)
    a = {"w": torch.randn(3, generator=g), "ids": torch.tensor([1, 2, 3])}
    b = {"w": torch.randn(3, generator=g), "ids": torch.tensor([7, 8, 9])}
    out = merged(
        {
            "method": "linear",
            "models": [{"uri": write(tmp_path / "a", a)}, {"uri": write(tmp_path / "b", b)}],
        },
        tmp_path,
    )
    assert torch.equal(out["ids"], a["ids"])
    torch.testing.assert_close(out["w"], (a["w"] + b["w"]) / 2)


def test_dare_is_reproducible_and_equals_the_direct_call(tmp_path):
    base, models, base_uri, uris = bf16_family(tmp_path, 2, seed=3)
    data = {
        "method": "dare_ties",
        "base": base_uri,
        "models": [{"uri": u} for u in uris],
        "params": {"density": 0.5},
        "seed": 11,
        "dtype": "float32",
    }
    first = merged(data, tmp_path, "a")
    again = merged(data, tmp_path, "b")
    other_seed = merged({**data, "seed": 12}, tmp_path, "c")
    recipe = parse_recipe({**data, "output": "unused"})
    method = get_method("dare_ties")
    for n in FLOAT_SHAPES:
        assert torch.equal(first[n], again[n])
        # The engine's result is the method called with (seed, tensor name): same bits.
        p = resolve_params(recipe, method, n, 2)
        ctx = MergeContext(name=n, seed=11)
        direct = method.fn(base[n].float(), [m[n].float() for m in models], p, ctx)
        assert torch.equal(first[n], direct)
    assert any(not torch.equal(first[n], other_seed[n]) for n in FLOAT_SHAPES)


def test_slerp_gradient_over_configured_layers(tmp_path):
    # config num_hidden_layers = 4: layer l gets t = l / 3 from t: [0, 1]; tensors outside the
    # layer stack get the first value (t = 0, the base).
    g = torch.Generator().manual_seed(4)
    names = [f"model.layers.{i}.w" for i in range(4)] + ["model.embed_tokens.weight"]
    a = {n: torch.randn(6, generator=g) for n in names}
    b = {n: torch.randn(6, generator=g) for n in names}
    config = {"num_hidden_layers": 4}
    out = merged(
        {
            "method": "slerp",
            "base": write(tmp_path / "a", a, config),
            "models": [{"uri": write(tmp_path / "b", b, config)}],
            "params": {"t": [0.0, 1.0]},
        },
        tmp_path,
    )
    for i in range(4):
        n = f"model.layers.{i}.w"
        expected = torch.tensor(slerp(i / 3, flat(a[n]), flat(b[n])), dtype=torch.float64)
        torch.testing.assert_close(out[n].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_scalar_tensors_are_merged_and_written(tmp_path):
    # task arithmetic on 0-d tensors: 2 + (3 - 2) + (5 - 2) = 6
    base_uri = write(tmp_path / "base", {"logit_scale": torch.tensor(2.0)})
    uris = [
        write(tmp_path / f"m{i}", {"logit_scale": torch.tensor(v)})
        for i, v in enumerate([3.0, 5.0])
    ]
    out = merged(
        {"method": "task_arithmetic", "base": base_uri, "models": [{"uri": u} for u in uris]},
        tmp_path,
    )
    assert torch.equal(out["logit_scale"], torch.tensor(6.0))
