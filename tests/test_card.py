"""The register stage writes a Hugging Face model card into the merged output: front matter the
Hub parses, mergekit's headings, the evaluation table, the gates; the model stays the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from amalgam import __version__
from amalgam.card import CARD_FILE
from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions
from amalgam.evaluate.report import build_report
from amalgam.evaluate.results import ModelResult
from amalgam.recipe import parse_recipe
from amalgam.registry import Registered, Registry
from amalgam.stages import execute
from amalgam.stages.fetch import FetchInput, FetchStage
from amalgam.stages.merge import Merged, MergeInput, MergeStage
from amalgam.stages.register import RegisterInput, RegisterStage
from amalgam.storage import resolve
from amalgam.writer import intact
from tests.helpers import family, recipe_dict, run_cli

T, F = True, False


def test_register_writes_a_card_the_hub_parses(tmp_path: Path) -> None:
    base, experts = family(tmp_path / "in", n=2)
    data = recipe_dict(base, experts, "task_arithmetic", tmp_path / "merged")
    data["params"] = {"lambda": 0.5}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gates = {"task_floor": 0.9, "floor_metric": "accuracy", "max_negative_flip_rate": 0.5}
    data["register"] = {"tracking_uri": tracking, "model_name": "carded", "gates": gates}
    recipe = parse_recipe(data)
    inputs = execute(FetchStage(), FetchInput(recipe)).models
    merged = execute(MergeStage(), MergeInput(recipe, MergeOptions(), inputs))
    # per-example results by hand: this model 3/4 and 2/2, the base 1/4 and 0/2, each expert
    # 4/4 on its task, the champion 2/4 and 2/2
    candidate = ModelResult.from_correct(
        str(merged.output), {"sort": [T, T, T, F], "count": [T, T]}
    )
    report = build_report(
        ["sort", "count"],
        candidate,
        base=ModelResult.from_correct(str(base), {"sort": [T, F, F, F], "count": [F, F]}),
        experts={
            "sort": ModelResult.from_correct(str(experts[0]), {"sort": [T] * 4}),
            "count": ModelResult.from_correct(str(experts[1]), {"count": [T, T]}),
        },
        champion=ModelResult.from_correct("/champ", {"sort": [T, T, F, F], "count": [T, T]}),
        champion_version="7",
    )
    fs_before = open_checkpoint(merged.output).content_hash()

    registered = execute(RegisterStage(), RegisterInput(recipe, merged, inputs, report))

    card_path = Path(merged.output) / CARD_FILE
    card = ModelCard.load(card_path)
    assert card.data.base_model == [str(base), str(experts[0]), str(experts[1])]
    assert card.data.tags == ["merge", "amalgam", "task_arithmetic"]
    assert card.data.library_name == "transformers"
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("sort", "acc", 0.75),
        ("count", "acc", 1.0),
    }
    text = card.text
    for heading in (
        "## Merge Details",
        "### Merge Method",
        "### Models Merged",
        "### Configuration",
    ):
        assert heading in text
    assert "| model | sort | count | average |" in text
    rows = {  # accuracy in %, then the mean over the row's tasks
        "this model": "| this model | 75.0 | 100.0 | 87.5 |",
        "base": "| base | 25.0 | 0.0 | 12.5 |",
        "expert": "| expert for sort | 100.0 | - | 100.0 |",
        "champion": "| champion (version 7) | 50.0 | 100.0 | 75.0 |",
    }
    for row in rows.values():
        assert row in text
    for label, model in [("base", base), ("expert0", experts[0]), ("expert1", experts[1])]:
        with open_checkpoint(str(model)) as ckpt:
            assert f"| {label} | `{model}` | `{ckpt.content_hash()}` |" in text
    assert f"amalgam {__version__}" in text and merged.content_hash in text
    assert "`lambda=0.5`" in text and "method: task_arithmetic" in text
    assert "- `task_floor` 0.9: failed: task_floor: task sort accuracy 0.7500 < floor 0.9" in text
    assert "- `max_negative_flip_rate` 0.5: passed" in text

    # the card is not the model: same content hash, the output still intact, and the
    # registered model carries it
    assert open_checkpoint(merged.output).content_hash() == fs_before == merged.content_hash
    fs, root = resolve(merged.output)
    assert intact(fs, root)
    registered_card = Path(Registry(tracking).model_path("carded", registered.version)) / CARD_FILE
    assert registered_card.read_text() == card_path.read_text()


def test_the_card_command_rewrites_a_card_from_the_registry(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    merged, _ = register_bare(tmp_path, tracking)
    card_path = Path(merged.output) / CARD_FILE
    written = card_path.read_text()
    card_path.unlink()
    uri = ["--tracking-uri", tracking]
    code, out, err = run_cli(["card", "bare", "1", *uri], monkeypatch, capsys)
    assert code == 0, err
    assert out.strip() == str(card_path)
    assert card_path.read_text() == written  # rebuilt from the run's records alone
    assert ModelCard.load(card_path).data.tags == ["merge", "amalgam", "task_arithmetic"]
    code, _, err = run_cli(["card", "bare", "9", *uri], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: bare@9: no such model version")


def register_bare(tmp_path: Path, tracking: str, **register: Any) -> tuple[Merged, Registered]:
    """A task-arithmetic merge of one expert registered as ``bare``, without evaluation."""
    base, experts = family(tmp_path / "in", n=1)
    data = recipe_dict(base, experts, "task_arithmetic", tmp_path / "merged")
    data["register"] = {"tracking_uri": tracking, "model_name": "bare", **register}
    recipe = parse_recipe(data)
    inputs = execute(FetchStage(), FetchInput(recipe)).models
    merged = execute(MergeStage(), MergeInput(recipe, MergeOptions(), inputs))
    return merged, execute(RegisterStage(), RegisterInput(recipe, merged, inputs))


def test_a_card_without_evaluation_says_so(tmp_path: Path) -> None:
    merged, _ = register_bare(tmp_path, f"sqlite:///{tmp_path / 'm.db'}")
    card = ModelCard.load(Path(merged.output) / CARD_FILE)
    assert card.data.eval_results is None
    assert "Not evaluated (the recipe has no evaluate section)." in card.text
