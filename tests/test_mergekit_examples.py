"""mergekit's own example configs (tests/fixtures/mergekit_examples, unchanged), with their
models replaced by the tiny zoo's and layer ranges scaled to its two layers, merge through
``amalgam merge`` into models that load in transformers and run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from zoo.conftest import zoo_tiny

from tests.helpers import run_cli

__all__ = ["zoo_tiny"]  # the fixture

EXAMPLES = Path(__file__).parent / "fixtures" / "mergekit_examples"
# mergekit's layer ranges are for 40-layer models
SOURCE_LAYERS = 40


def localized(text: str, zoo) -> tuple[str, int]:
    """The config with every model reference replaced by a zoo model (the same reference, the
    same model) and every layer range scaled to the zoo's layers; and the expected layer count."""
    cfg = yaml.safe_load(text)
    refs = sorted(
        set([*re.findall(r"model: *([^\s#]+)", text), cfg.get("base_model") or ""]) - {""}
    )
    pool = [zoo.base, *zoo.experts.values()]
    for ref, path in zip(refs, pool, strict=False):
        text = re.sub(rf"(?<=[\s:]){re.escape(ref)}(?=\s|$)", str(path), text)
    layers = 2
    if "slices" in cfg:
        layers = 0
        for piece in cfg["slices"]:
            a, b = piece["sources"][0]["layer_range"]
            layers += round(b * 2 / SOURCE_LAYERS) - round(a * 2 / SOURCE_LAYERS)
        text = re.sub(
            r"layer_range: \[(\d+), (\d+)\]",
            lambda m: (
                f"layer_range: [{round(int(m[1]) * 2 / SOURCE_LAYERS)}, "
                f"{round(int(m[2]) * 2 / SOURCE_LAYERS)}]"
            ),
            text,
        )
    return text, layers


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yml")))
def test_mergekit_example_merges_and_loads(example, zoo_tiny, tmp_path, monkeypatch, capsys):
    text, layers = localized((EXAMPLES / example).read_text(), zoo_tiny)
    config = tmp_path / example
    config.write_text(text)
    out = tmp_path / "out"
    code, _stdout, stderr = run_cli(
        ["merge", str(config), "--output", str(out), "--threads", "1", "--device", "cpu"],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == layers
    logits = model(torch.tensor([[2, 11, 12, 13]])).logits
    assert torch.isfinite(logits).all()


def test_there_are_six_examples():
    assert len(list(EXAMPLES.glob("*.yml"))) == 6
