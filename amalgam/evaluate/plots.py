"""PNG plots of an evaluation report (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amalgam.evaluate.report import EvalReport


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # lazy: matplotlib, only when a report is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    return plt


def _short(tasks: list[str]) -> list[str]:
    """Task names without a prefix they all share (``zoo_``), for readable tick labels."""
    head = tasks[0].partition("_")[0] + "_" if tasks else ""
    shared = len(tasks) > 1 and all(t.startswith(head) for t in tasks)
    return [t.removeprefix(head) if shared else t for t in tasks]


def _bars(path: Path, tasks: list[str], series: dict[str, list[float]], title: str, ylabel: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) + 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks(range(len(tasks)), _short(tasks), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(report: EvalReport, out: Path) -> list[Path]:
    """accuracy.png (candidate, base, experts, champion per task), normalized_accuracy.png
    and, with a champion, negative_flips.png."""
    tasks = report.tasks
    series = {"candidate": [report.accuracy[t] for t in tasks]}
    if report.base is not None:
        series["base"] = [report.base.tasks[t].accuracy for t in tasks]
    if report.experts:
        series["expert"] = [
            report.experts[t].tasks[t].accuracy if t in report.experts else 0.0 for t in tasks
        ]
    if report.champion is not None:
        series["champion"] = [report.champion.tasks[t].accuracy for t in tasks]
    files = [_bars(out / "accuracy.png", tasks, series, "accuracy per task", "accuracy")]
    normalized = [report.normalized_accuracy.get(t) or 0.0 for t in tasks]
    files.append(
        _bars(
            out / "normalized_accuracy.png",
            tasks,
            {"candidate / expert": normalized},
            "normalized accuracy (candidate / expert)",
            "normalized accuracy",
        )
    )
    if report.flips:
        flips = report.flips
        flipped = [t for t in tasks if t in flips]
        files.append(
            _bars(
                out / "negative_flips.png",
                flipped,
                {
                    "negative (champion right, candidate wrong)": [
                        flips[t].negative_flip_rate for t in flipped
                    ],
                    "positive": [flips[t].positive_flip_rate for t in flipped],
                },
                "flips against the champion",
                "share of examples",
            )
        )
    return files
