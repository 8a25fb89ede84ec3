"""Per-task accuracy tables (rows are models) for the terminal and for markdown reports."""

from __future__ import annotations

from statistics import mean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

AVERAGE = "average"


def table_cells(rows: dict[str, dict[str, float]], tasks: list[str]) -> list[list[str]]:
    """One list of cells per row: label, accuracy per task in %, then the average over the
    tasks the row has ('-' for a task it lacks)."""
    cells = []
    for label, scores in rows.items():
        present = [scores[t] for t in tasks if t in scores]
        average = f"{100 * mean(present):.1f}" if present else "-"
        cells.append(
            [label, *(f"{100 * scores[t]:.1f}" if t in scores else "-" for t in tasks), average]
        )
    return cells


def render_table(rows: dict[str, dict[str, float]], tasks: list[str]) -> Table:
    """A rich table: one row per label, one column per task (accuracy in %), then the average."""
    from rich.table import Table  # lazy: the markdown renderer does not need rich

    table = Table(title="accuracy (%)")
    table.add_column("model", no_wrap=True)
    head = tasks[0].partition("_")[0] + "_" if tasks else ""
    shared = len(tasks) > 1 and all(t.startswith(head) for t in tasks)  # e.g. "zoo_"
    for column in (*tasks, AVERAGE):
        table.add_column(column.removeprefix(head) if shared else column, justify="right")
    for cells in table_cells(rows, tasks):
        table.add_row(*cells)
    return table


def render_markdown(rows: dict[str, dict[str, float]], tasks: list[str]) -> str:
    """The same table as GitHub markdown."""
    lines = [
        "| " + " | ".join(("model", *tasks, AVERAGE)) + " |",
        "|---" + "|---:" * (len(tasks) + 1) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_cells(rows, tasks)]
    return "\n".join(lines) + "\n"
