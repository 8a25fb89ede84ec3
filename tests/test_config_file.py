"""YAML config files: ${VAR} values, and bombs (aliases, depth, size) refused at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from amalgam.config_file import MAX_BYTES, MAX_DEPTH, MAX_VALUES, load_yaml
from amalgam.errors import RecipeError
from tests.helpers import run_cli

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_variables_are_typed_like_written_values(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEED", "7")
    monkeypatch.setenv("ZOO", "/z")
    monkeypatch.delenv("UNSET_FOR_TEST", raising=False)
    text = (
        "# ${UNSET_FOR_TEST} in a comment is left alone\n"
        "seed: ${SEED}\n"
        "quoted: '${SEED}'\n"
        "uri: ${ZOO}/base\n"
        "fallback: ${UNSET_FOR_TEST:-/default}/x\n"
        "tagged: !!str ${SEED}\n"
    )
    assert load_yaml(write(tmp_path, text)) == {
        "seed": 7,
        "quoted": "7",
        "uri": "/z/base",
        "fallback": "/default/x",
        "tagged": "7",
    }


def test_an_unset_variable_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("UNDEFINED_VAR", raising=False)
    path = write(tmp_path, "method: linear\nmodels:\n  - uri: ${UNDEFINED_VAR}/a\n")
    with pytest.raises(RecipeError, match=r"line 3: \$\{UNDEFINED_VAR\} is not set") as err:
        load_yaml(path)
    assert str(path) in str(err.value)


def test_the_cli_refuses_an_unset_variable_in_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.delenv("UNDEFINED_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "method: linear\nmodels:\n  - uri: a\noutput: ${UNDEFINED_VAR}\n")
    code, _, err = run_cli(["merge", str(path)], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "${UNDEFINED_VAR} is not set" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BOMB, f"expands to over {MAX_VALUES} values"),
        ("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", "nested deeper"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "maximum nesting depth"),
        ("a: &a [1, *a]\n", "refers to a value that contains it"),
        ("a: 1\n# " + "x" * MAX_BYTES + "\n", "too large"),
        ("a: [1\n", "not valid YAML"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
    ],
    ids=["alias-bomb", "deep", "very-deep", "recursive-alias", "huge", "broken", "two-documents"],
)
def test_hostile_files_are_refused_in_milliseconds(tmp_path, text, message) -> None:
    path = write(tmp_path, text)
    start = time.process_time()  # CPU time: a loaded machine may not schedule the test
    with pytest.raises(RecipeError, match=message) as err:
        load_yaml(path)
    assert time.process_time() - start < 1.0
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_aliases_that_stay_small_are_fine(tmp_path) -> None:
    text = "defaults: &d {density: 0.2}\nparams: *d\nmore: [*d, *d]\n"
    assert load_yaml(write(tmp_path, text))["more"] == [{"density": 0.2}] * 2
