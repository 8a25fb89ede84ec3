"""Accuracy tables: a rich table for the terminal and markdown for reports."""

from __future__ import annotations

from rich.console import Console

from amalgam.evaluate import render_markdown, render_table

ROWS = {"base": {"a": 0.5, "b": 0.25}, "expert": {"a": 1.0}}


def test_rich_table_has_a_column_per_task_and_the_average() -> None:
    table = render_table(ROWS, ["a", "b"])
    assert [c.header for c in table.columns] == ["model", "a", "b", "average"]
    assert list(table.columns[3].cells) == ["37.5", "100.0"]
    assert list(table.columns[2].cells) == ["25.0", "-"]
    console = Console(width=80, record=True)
    console.print(table)
    assert "37.5" in console.export_text()


def test_markdown_table() -> None:
    assert render_markdown(ROWS, ["a", "b"]).splitlines() == [
        "| model | a | b | average |",
        "|---|---:|---:|---:|",
        "| base | 50.0 | 25.0 | 37.5 |",
        "| expert | 100.0 | - | 100.0 |",
    ]
