"""Every method takes adapters: a merge over PEFT adapters equals the same merge over PEFT's
merge_and_unload of each (to float32 rounding), on synthetic Llamas and on the zoo's adapters;
local and Ray executors write the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
from amalgam.zoo import build_zoo
from tests.adapters.builders import adapter, base_model, peft_merged
from tests.helpers import recipe_dict
from tests.zoo.conftest import zoo_home

# three adapters of different kinds: plain, rsLoRA with rank/alpha patterns, DoRA
ADAPTERS = [
    {},
    {"use_rslora": True, "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"q_proj": 5}},
    {"use_dora": True, "perturb": True, "r": 3},
]
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "tsv_m", "opcm"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """(base, adapters, PEFT-merged models) over a synthetic Llama."""
    root = tmp_path_factory.mktemp("adapters")
    base = base_model(root / "base")
    loras = [adapter(base, root / f"lora{i}", seed=i + 1, **c) for i, c in enumerate(ADAPTERS)]
    merged = [peft_merged(base, a, root / f"merged{i}") for i, a in enumerate(loras)]
    return base, loras, merged


def merge(data: dict, output: Path | None = None) -> dict[str, torch.Tensor]:
    """Run a recipe (or a mergekit config, written to ``output``) and load its output."""
    options = MergeOptions(output=str(output) if output else None, threads=1)
    result = run_merge(parse_recipe(data), options)
    return load_file(str(Path(result.output) / "model.safetensors"))


def assert_same_merge(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_method_on_adapters_equals_method_on_merged_models(
    method: str, family: tuple[Path, list[Path], list[Path]], tmp_path: Path
) -> None:
    base, loras, merged = family
    # the last adapter names its base in its URI (mergekit's BASE+ADAPTER), the others take
    # the recipe's base
    uris = [*loras[:-1], Path(f"{base}+{loras[-1]}")]
    got = merge(recipe_dict(base, uris, method, tmp_path / "from-adapters"))
    want = merge(recipe_dict(base, merged, method, tmp_path / "from-merged"))
    assert_same_merge(got, want)
    original = load_file(str(base / "model.safetensors"))
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"],
        original["model.layers.0.self_attn.q_proj.weight"],
    )
    assert not (tmp_path / "from-adapters" / "adapter_config.json").exists()


def test_zoo_adapters_linear_is_the_mean_of_merged_models(tmp_path: Path) -> None:
    """The case that used to average A and B separately: linear over two zoo adapters."""
    zoo = build_zoo(zoo_home(), profile="tiny", log=lambda _: None)
    loras = [zoo.loras[t] for t in sorted(zoo.loras)[:2]]
    merged = [peft_merged(zoo.base, a, tmp_path / f"merged-{a.name}") for a in loras]
    got = merge(recipe_dict(zoo.base, loras, "linear", tmp_path / "from-adapters"))
    want = merge(recipe_dict(zoo.base, merged, "linear", tmp_path / "from-merged"))
    assert_same_merge(got, want)
    mean = {k: (merged_a + merged_b) / 2 for k, merged_a, merged_b in _zip(merged)}
    assert_same_merge(got, mean)


def _zip(folders: list[Path]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    a, b = (load_file(str(f / "model.safetensors")) for f in folders)
    return [(k, a[k], b[k]) for k in a]


def test_mergekit_model_plus_lora(family: tuple[Path, list[Path], list[Path]], tmp_path) -> None:
    base, loras, merged = family

    def config(models: list[str]) -> dict:
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models],
        }

    got = merge(config([f"{base}+{a}" for a in loras[:2]]), tmp_path / "a")
    want = merge(config([str(m) for m in merged[:2]]), tmp_path / "m")
    assert_same_merge(got, want)


def test_local_and_ray_write_the_same_bytes(
    family: tuple[Path, list[Path], list[Path]], tmp_path: Path
) -> None:
    base, loras, _ = family
    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        data = recipe_dict(base, loras, "ties", out, max_shard_size=20_000)
        run_merge(parse_recipe(data), MergeOptions(executor=executor, threads=1))
        outs[executor] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir())
            if p.suffix == ".safetensors"
        }
    assert len(outs["local"]) > 1  # several shards: several Ray tasks
    assert outs["local"] == outs["ray"]


def test_linear_without_a_recipe_base(
    family: tuple[Path, list[Path], list[Path]], tmp_path: Path
) -> None:
    """Each adapter names its base in its URI; the recipe has none."""
    base, loras, merged = family
    uris = [Path(f"{base}+{a}") for a in loras]
    got = merge(recipe_dict(None, uris, "linear", tmp_path / "from-adapters"))
    want = merge(recipe_dict(None, merged, "linear", tmp_path / "from-merged"))
    assert_same_merge(got, want)
