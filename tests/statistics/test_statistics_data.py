"""Data for statistics: task folders and jsonl records, their hash, encoding, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from amalgam.errors import StatisticsError
from amalgam.statistics.data import Example, encode, load_examples
from amalgam.zoo.tokenizer import build_tokenizer
from tests.statistics.tiny_models import RECORDS, write_jsonl


def test_record_forms(tmp_path: Path) -> None:
    examples, _ = load_examples(str(write_jsonl(tmp_path / "d.jsonl", RECORDS)))
    assert examples[0] == Example("sort:3142=", "1234")
    assert examples[2] == Example("", "count 12 and 7")
    assert examples[3] == Example("cmp:9>4=", "yes")  # choices[label]


def test_task_folder_reads_its_validation_split(tmp_path: Path) -> None:
    folder = tmp_path / "zoo_cmp"
    folder.mkdir()
    write_jsonl(folder / "validation.jsonl", RECORDS[3:4])
    write_jsonl(folder / "test.jsonl", RECORDS[:1])
    examples, folder_hash = load_examples(str(folder))
    assert examples == [Example("cmp:9>4=", "yes")]
    # The hash is of the examples, not of the file: the same record as prompt + answer agrees.
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "cmp:9>4=", "answer": "yes"}])
    assert load_examples(str(same))[1] == folder_hash
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "cmp:9>4=", "answer": "no"}])
    assert load_examples(str(other))[1] != folder_hash


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n', "d.jsonl:1: a record needs"),
        ('{"text": "a"}\n{oops\n', "d.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "choices": ["x"], "label": 3}\n', "valid 'label'"),
        ("\n\n", "holds no records"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(StatisticsError, match=message):
        load_examples(str(tmp_path / "d.jsonl"))


def test_missing_data(tmp_path: Path) -> None:
    with pytest.raises(StatisticsError, match="no such data file or task folder"):
        load_examples(str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "empty_task").mkdir()
    with pytest.raises(StatisticsError, match=r"holds no validation\.jsonl"):
        load_examples(str(tmp_path / "empty_task"))


def test_encode_scores_the_answer_and_keeps_its_end() -> None:
    tokenizer = build_tokenizer(32)
    prompt, text = encode(tokenizer, [Example("ab=", "cd"), Example("", "xyz")], 32)
    assert len(prompt.ids) == 5 and prompt.start == 3  # 'c' and 'd' are scored
    assert text.start == 1  # nothing predicts the first token of a text record
    (cut,) = encode(tokenizer, [Example("abcdef=", "gh")], 4)
    assert tokenizer.decode(list(cut.ids)) == "f=gh" and cut.start == 2
