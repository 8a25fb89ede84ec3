"""merge_pipeline as a real Prefect flow against a real MLflow server; gated promotion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from recipes import TASKS, evaluate_section, register_section
from safetensors.torch import load, load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.compress.stage import decompress_model
from amalgam.evaluate.quick import quick_evaluate
from amalgam.evaluate.report import REPORT_FILE, EvalReport
from amalgam.recipe import parse_recipe
from amalgam.registry import Registry
from amalgam.stages.evaluate import DECOMPRESSED_FROM, report_dir
from amalgam_flows.pipeline import merge_pipeline
from tests.helpers import family, recipe_dict, run_cli

POSITION_IDS = "embeddings.position_ids"

pytestmark = pytest.mark.usefixtures("prefect_server")


def ta_recipe(zoo, output: Path, experts: list[str], lam: float, **sections) -> dict:
    return {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "models": [{"uri": str(zoo.experts[e])} for e in experts],
        "params": {"lambda": lam},
        "dtype": "float32",
        "output": str(output),
        **sections,
    }


@pytest.mark.slow
def test_pipeline_registers_with_lineage_and_reruns_idempotently(
    zoo_tiny, tmp_path: Path, mlflow_server: str
) -> None:
    experts = ["zoo_mulmod", "zoo_compare"]
    recipe = parse_recipe(
        ta_recipe(
            zoo_tiny,
            tmp_path / "merged",
            experts,
            0.5,
            evaluate=evaluate_section(zoo_tiny),
            register=register_section(mlflow_server, "pipe"),
        )
    )
    first = merge_pipeline(recipe)
    assert not first.skipped_merge
    # the merge against an independent computation: base + 0.5 * sum of task vectors
    base = load_file(zoo_tiny.base / "model.safetensors")
    tuned = [load_file(zoo_tiny.experts[e] / "model.safetensors") for e in experts]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name in [n for n in base if n.endswith(("q_proj.weight", "down_proj.weight"))]:
        expected = base[name] + 0.5 * sum(t[name] - base[name] for t in tuned)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)

    registry = Registry(mlflow_server)
    version = first.registered["version"]
    assert registry.alias_version("pipe", "candidate") == version
    lineage = registry.lineage("pipe", version)
    assert {k: p.hash for k, p in lineage.parents.items()} == {
        m["label"]: m["content_hash"] for m in first.inputs
    }
    assert lineage.metrics["mean_accuracy"] == pytest.approx(first.report["mean_accuracy"])
    assert lineage.recipe["params"] == {"lambda": 0.5}
    stamp = (tmp_path / "merged" / "model.safetensors").stat().st_mtime_ns

    second = merge_pipeline(recipe)
    assert second.skipped_merge
    assert (tmp_path / "merged" / "model.safetensors").stat().st_mtime_ns == stamp
    assert second.registered["version"] == version and not second.registered["created"]
    assert len(registry.client.search_model_versions("name = 'pipe'")) == 1


@pytest.mark.slow
def test_a_compressed_merge_is_scored_as_decompressed(
    zoo_tiny, tmp_path: Path, mlflow_server: str
) -> None:
    recipe = parse_recipe(
        ta_recipe(
            zoo_tiny,
            tmp_path / "merged",
            TASKS,
            0.5,
            compress={"density": 0.3, "output": str(tmp_path / "packed")},
            evaluate=evaluate_section(zoo_tiny),
            register=register_section(mlflow_server, "packed"),
        )
    )
    result = merge_pipeline(recipe)
    assert result.compressed["output"] == str(tmp_path / "packed")
    # scored independently: decompress here, then the quick scorer on the same examples
    dense = decompress_model(str(tmp_path / "packed"), str(zoo_tiny.base), str(tmp_path / "d"))
    model = AutoModelForCausalLM.from_pretrained(dense)
    scores = quick_evaluate(
        model, AutoTokenizer.from_pretrained(dense), zoo_tiny.tasks_dir, TASKS, limit=24
    )
    for task in TASKS:
        assert result.report[f"compressed.accuracy.{task}"] == pytest.approx(scores[task])
    expected = sum(scores.values()) / len(TASKS)
    assert result.report["compressed.mean_accuracy"] == pytest.approx(expected)
    # the report scored the stage's own decompressed copy, which is not the merge itself
    report = EvalReport.read(report_dir(result.content_hash) / REPORT_FILE)
    copy = Path(report.compressed.uri)
    assert (copy / DECOMPRESSED_FROM).read_text().strip() == str(tmp_path / "packed")
    ours, theirs = (load_file(Path(f, "model.safetensors")) for f in (dense, copy))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert not all(torch.equal(ours[k], merged[k]) for k in ours)
    # the uncompressed merge is still the candidate, and MLflow has both
    assert report.candidate.uri == str(tmp_path / "merged")
    lineage = Registry(mlflow_server).lineage("packed", result.registered["version"])
    assert lineage.metrics["compressed.mean_accuracy"] == pytest.approx(expected)


@pytest.mark.slow
def test_a_candidate_that_regresses_a_task_is_not_promoted(
    zoo_tiny, tmp_path: Path, tracking_uri: str, monkeypatch, capsys
) -> None:
    sections = {
        "evaluate": evaluate_section(zoo_tiny, perplexity=False),
        "register": register_section(tracking_uri, "gated", max_negative_flip_rate=0.1),
    }
    good = ta_recipe(zoo_tiny, tmp_path / "good", ["zoo_compare"], 1.0, **sections)
    v1 = merge_pipeline(parse_recipe(good)).registered["version"]
    code, _, err = run_cli(
        ["promote", "gated", v1, "--tracking-uri", tracking_uri], monkeypatch, capsys
    )
    assert code == 0, err

    # lambda 0 gives back the base, which loses the compare expert's gains; its recipe asks for
    # no gates at all, but the registry's policy (the first registration's gates) decides
    lax = sections | {"register": register_section(tracking_uri, "gated")}
    worse = ta_recipe(zoo_tiny, tmp_path / "worse", ["zoo_compare"], 0.0, **lax)
    v2 = merge_pipeline(parse_recipe(worse)).registered["version"]
    code, _, err = run_cli(
        ["promote", "gated", v2, "--tracking-uri", tracking_uri], monkeypatch, capsys
    )
    assert code == 2
    assert "max_negative_flip_rate: task zoo_compare" in err and "(registry policy)" in err
    registry = Registry(tracking_uri)
    assert registry.alias_version("gated", "champion") == v1
    tags = registry.client.get_run(registry.lineage("gated", v2).run_id).data.tags
    assert tags["amalgam.promotion"] == "refused"
    assert "max_negative_flip_rate: task zoo_compare" in tags["amalgam.promotion.reason"]


@pytest.mark.slow
def test_amalgam_run_follows_extra_tensors_as_amalgam_merge_does(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """BERT-style int64 position_ids in the base only: both commands copy it from the base. An
    lm_head only in an expert: both refuse it, naming it and the model, unless the recipe
    keeps it (then both write the same bytes)."""
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    base, experts = family(tmp_path / "in", n=2)
    ids = torch.arange(16)[None]
    weights = base / "model.safetensors"
    save_file({**load_file(weights), POSITION_IDS: ids}, weights)
    head = torch.ones(16, 8, dtype=torch.bfloat16)
    cfg = tmp_path / "r.yaml"

    def both(tag: str, code_wanted: int, **extra) -> dict[str, bytes]:
        written = {}
        for command in ("merge", "run"):
            out = tmp_path / f"{tag}-{command}"
            data = {**recipe_dict(base, experts, "task_arithmetic", out), **extra}
            cfg.write_text(yaml.safe_dump(data))
            code, _, err = run_cli([command, str(cfg)], monkeypatch, capsys)
            assert code == code_wanted, err
            if code:
                assert "lm_head.weight" in err and "expert1" in err, err
                assert not out.exists()
            else:
                written[command] = (out / "model.safetensors").read_bytes()
                assert torch.equal(load_file(out / "model.safetensors")[POSITION_IDS], ids)
        assert len(set(written.values())) <= 1
        return written

    both("ids", 0)
    expert = load_file(experts[1] / "model.safetensors")
    save_file({**expert, "lm_head.weight": head}, experts[1] / "model.safetensors")
    both("head", 2)
    kept = both("kept", 0, extra_tensors="keep_from_first")
    assert torch.equal(load(kept["run"])["lm_head.weight"], head)
