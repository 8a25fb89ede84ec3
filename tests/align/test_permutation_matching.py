"""Weight and activation matching through the align stage's entry (``run_align``): a permuted
copy of the tiny zoo base (MLP units, KV groups, heads, head dims; and the residual stream),
of a seeded random BERT and of a random Qwen2 (q/k/v biases, tied embeddings) comes back
equal to the original in every tensor; experts of the base come out as the identity; the
permutations are an artifact a re-run reuses; bad input is refused with the field, tensor or
labels named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from s3server import S3Server
from safetensors.torch import load_file

from amalgam.align import run_align
from amalgam.align.permutation.apply import permuted_copy
from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError
from amalgam.pipeline import run_pipeline
from amalgam.recipe import AlignSpec, parse_recipe
from tests.align.permutation_models import (
    bert_model,
    logit_gap,
    qwen2_model,
    tensors_equal,
    tiny_zoo,
)
from tests.helpers import recipe_dict


def align(method: str, inputs: dict[str, Path], workdir: Path, **permutation) -> dict[str, str]:
    spec = AlignSpec(method=method, permutation=permutation)
    return run_align(spec, {k: str(v) for k, v in inputs.items()}, workdir=str(workdir))


@pytest.mark.parametrize("residual", [False, True])
def test_weight_matching_recovers_a_permuted_zoo_llama(tmp_path: Path, residual: bool) -> None:
    zoo = tiny_zoo()
    permuted = Path(permuted_copy(str(zoo.base), str(tmp_path / "p"), 21, residual=residual))
    assert tensors_equal(zoo.base, permuted)
    experts = dict(sorted(zoo.experts.items())[:2])
    inputs = {"base": zoo.base, "permuted": permuted, **experts}
    out = align("weight_matching", inputs, tmp_path / "work", residual=residual)
    assert Path(out["permuted"]).parent == tmp_path / "work" / "models"
    assert tensors_equal(zoo.base, Path(out["permuted"])) == []
    if not residual:  # fine-tunes of the base are already in its basis
        assert {label: out[label] for label in experts} == {k: str(v) for k, v in experts.items()}
    perms = load_file(tmp_path / "work" / "permutations" / "permuted.safetensors")
    assert "model.layers.1.self_attn.heads" in perms and ("residual" in perms) == residual
    search = json.loads((tmp_path / "work" / "permutations" / "search.json").read_text())
    assert search["permuted"]["seconds"] > 0 and search["permuted"]["passes"] >= 2


@pytest.mark.parametrize("residual", [False, True])
def test_weight_matching_recovers_a_permuted_bert(tmp_path: Path, residual: bool) -> None:
    bert = bert_model(tmp_path / "bert", seed=4)
    permuted = Path(permuted_copy(str(bert), str(tmp_path / "p"), 8, residual=residual))
    out = align("weight_matching", {"a": bert, "b": permuted}, tmp_path / "w", residual=residual)
    assert out["a"] == str(bert)
    assert tensors_equal(bert, permuted) and tensors_equal(bert, Path(out["b"])) == []


@pytest.mark.parametrize("residual", [False, True])
def test_a_qwen2_with_biases_keeps_its_logits_and_is_recovered(
    tmp_path: Path, residual: bool
) -> None:
    qwen = qwen2_model(tmp_path / "qwen", seed=5)
    permuted = Path(permuted_copy(str(qwen), str(tmp_path / "p"), 2, residual=residual))
    assert any(n.endswith("k_proj.bias") for n in tensors_equal(qwen, permuted))
    prompts = [torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))]
    assert (
        logit_gap(qwen, permuted, prompts)
        < 1e-4
        < logit_gap(qwen, qwen2_model(tmp_path / "o", 6), prompts)
    )
    out = align("weight_matching", {"base": qwen, "p": permuted}, tmp_path / "w", residual=residual)
    assert tensors_equal(qwen, Path(out["p"])) == []


def test_a_rerun_reuses_the_permutations_and_the_copy(tmp_path: Path) -> None:
    zoo = tiny_zoo()
    permuted = permuted_copy(str(zoo.base), str(tmp_path / "p"), 2)
    inputs = {"base": zoo.base, "permuted": Path(permuted)}
    out = align("weight_matching", inputs, tmp_path / "work")
    artifacts = [
        tmp_path / "work" / "permutations" / "permuted.safetensors",
        tmp_path / "work" / "models" / "permuted" / "model.safetensors",
    ]
    stamps = [p.stat().st_mtime_ns for p in artifacts]
    assert align("weight_matching", inputs, tmp_path / "work") == out
    assert [p.stat().st_mtime_ns for p in artifacts] == stamps
    spec_file = tmp_path / "work" / "permutations" / "permuted.safetensors.json"
    assert json.loads(spec_file.read_text())["architecture"] == "llama"


@pytest.mark.parametrize(("data", "residual"), [("tasks", False), ("text", False), ("tasks", True)])
def test_activation_matching_recovers_a_permuted_zoo_llama(
    tmp_path: Path, data: str, residual: bool
) -> None:
    zoo = tiny_zoo()
    permuted = Path(permuted_copy(str(zoo.base), str(tmp_path / "p"), 13, residual=residual))
    source = zoo.tasks_dir
    if data == "text":
        source = tmp_path / "lines.txt"
        records = (zoo.tasks_dir / "zoo_sort" / "test.jsonl").open()
        source.write_text("".join(json.loads(line)["prompt"] + "\n" for line in records))
    out = align(
        "activation_matching",
        {"base": zoo.base, "permuted": permuted},
        tmp_path / "work",
        data=str(source),
        samples=64,
        residual=residual,
    )
    assert tensors_equal(zoo.base, Path(out["permuted"])) == []


def test_bad_input_is_named(tmp_path: Path) -> None:
    zoo = tiny_zoo()
    with pytest.raises(
        PlanError, match=r"align\.permutation\.data: activation matching needs data"
    ):
        align("activation_matching", {"base": zoo.base, "b": zoo.base}, tmp_path / "a")
    with pytest.raises(
        PlanError, match=rf"align\.permutation\.data: {tmp_path}/none does not exist"
    ):
        align(
            "activation_matching", {"base": zoo.base}, tmp_path / "b", data=str(tmp_path / "none")
        )
    with pytest.raises(PlanError, match=r"align\.permutation\.reference: 'x' is not an input"):
        align("weight_matching", {"base": zoo.base}, tmp_path / "c", reference="x")
    bert = bert_model(tmp_path / "bert", seed=0)
    with pytest.raises(PlanError, match="architectures differ: base is llama, encoder is bert"):
        align("weight_matching", {"base": zoo.base, "encoder": bert}, tmp_path / "d")
    assert not (tmp_path / "d" / "models").exists()


def test_the_pipeline_merges_the_aligned_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Averaging the base with a permuted copy of itself gives the base back once the align
    stage has matched the copy, and something else without alignment."""
    zoo = tiny_zoo()
    permuted = Path(permuted_copy(str(zoo.base), str(tmp_path / "p"), 6))
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    merged = {}
    for method in ("check", "weight_matching"):
        out = tmp_path / f"merged-{method}"
        recipe = recipe_dict(None, [zoo.base, permuted], "linear", out, align={"method": method})
        merged[method] = Path(run_pipeline(parse_recipe(recipe)).output)
    assert tensors_equal(zoo.base, merged["weight_matching"]) == []
    assert tensors_equal(zoo.base, merged["check"])
    assert list((tmp_path / "home" / "cache" / "aligned").glob("*/models/*/model.safetensors"))


def test_weight_matching_reads_and_writes_s3(s3: S3Server) -> None:
    """A permuted copy written to S3 is aligned with the workdir on S3 too: the permutations
    and the aligned copy land there, and a re-run finds them."""
    zoo = tiny_zoo()
    bucket = s3.make_bucket("perm-align")
    options = s3.storage_options()
    permuted = permuted_copy(str(zoo.base), f"s3://{bucket}/permuted", 17, **options)
    spec = AlignSpec(method="weight_matching")
    inputs = {"base": str(zoo.base), "permuted": permuted}
    work = f"s3://{bucket}/work"
    out = run_align(spec, inputs, workdir=work, **options)
    assert out["permuted"] == f"{work}/models/permuted"
    base, aligned = Checkpoint(str(zoo.base)), Checkpoint(out["permuted"], **options)
    assert all(torch.equal(base.tensor(n), aligned.tensor(n)) for n in base.names())
    assert s3.filesystem().exists(f"{bucket}/work/permutations/permuted.safetensors")
    assert run_align(spec, inputs, workdir=work, **options) == out
