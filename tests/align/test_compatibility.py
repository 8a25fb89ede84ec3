"""The align stage's compatibility check: names, shapes and vocabulary, differences named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amalgam.align import CompatibilityError, check_compatibility, run_align
from amalgam.recipe import AlignSpec
from tests.helpers import llama_tensors, write_model


def tokenizer_json(
    folder: Path, vocab: dict[str, int], added: dict[str, int] | None = None
) -> None:
    data = {
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        "added_tokens": [{"id": i, "content": t} for t, i in (added or {}).items()],
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))


VOCAB = {"<unk>": 0, "a": 1, "b": 2, "c": 3}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    folder = write_model(tmp_path / "base", llama_tensors(0))
    tokenizer_json(folder, VOCAB, {"<eos>": 4})
    return folder


def test_fine_tunes_of_one_base_are_compatible(base: Path, tmp_path: Path) -> None:
    other = write_model(tmp_path / "ft", llama_tensors(1, torch.float32))  # dtype may differ
    tokenizer_json(other, VOCAB, {"<eos>": 4})
    report = check_compatibility({"base": str(base), "ft": str(other)})
    assert report.ok and report.problems == [] and report.tensors == len(llama_tensors(0))
    assert run_align(AlignSpec(), {"base": str(base), "ft": str(other)}) == {
        "base": str(base),
        "ft": str(other),
    }


def test_every_difference_is_named(base: Path, tmp_path: Path) -> None:
    tensors = llama_tensors(1)
    tensors["model.embed_tokens.weight"] = torch.zeros(18, 8, dtype=torch.bfloat16)
    del tensors["model.norm.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    other = write_model(tmp_path / "odd", tensors, {"vocab_size": 18})
    (base / "config.json").write_text(json.dumps({"vocab_size": 16}))
    tokenizer_json(other, {"<unk>": 0, "a": 1, "c": 2, "b": 3}, {"<eos>": 4, "<pad>": 5})
    with pytest.raises(CompatibilityError) as err:
        check_compatibility({"base": str(base), "odd": str(other)})
    message = str(err.value)
    for part in (
        f"differ from the reference base ({base})",
        "odd: tensor model.embed_tokens.weight has shape [18, 8], the reference [16, 8]",
        "odd: lacks tensor model.norm.weight",
        "odd: has tensor model.extra.weight, which the reference lacks",
        "odd: config.json vocab_size is 18, the reference 16",
        "odd: token 'b' has id 3, the reference id 2",
        "odd: token 'c' has id 2, the reference id 3",
        "odd: token '<pad>' has id 5, the reference none",
    ):
        assert part in message
    report = err.value.report
    kinds = sorted({p.kind for p in report.problems})
    assert kinds == ["extra_tensor", "missing_tensor", "shape", "vocab_size", "vocabulary"]
    assert report.to_dict()["ok"] is False


def test_report_without_raising_and_without_vocabulary(base: Path, tmp_path: Path) -> None:
    other = write_model(tmp_path / "ft", llama_tensors(1))
    tokenizer_json(other, {"<unk>": 0, "z": 1})
    report = check_compatibility([str(base), str(other)], raise_on_error=False)
    assert not report.ok
    assert {p.model for p in report.problems} == {str(other)}
    assert check_compatibility([str(base), str(other)], vocabulary=False).ok


def test_long_lists_are_cut(base: Path, tmp_path: Path) -> None:
    other = write_model(tmp_path / "empty", {"x": torch.zeros(1)})
    with pytest.raises(CompatibilityError, match=r"empty: \.\.\. and \d+ more missing_tensor"):
        check_compatibility({"base": str(base), "empty": str(other)}, vocabulary=False)
