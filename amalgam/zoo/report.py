"""The zoo's accuracy report (report.md and report.json) and its experts-beat-base check."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from amalgam.evaluate.table import render_markdown
from amalgam.zoo.profiles import Profile
from amalgam.zoo.routing import Routing, task_separation

#: An expert should beat the base on its own task by at least this much accuracy.
MIN_EXPERT_GAIN = 0.05


def own_task_gains(accuracy: dict[str, dict[str, float]], kind: str) -> dict[str, float]:
    """Task -> accuracy of the `kind` ('expert' or 'lora') model of that task minus the base's."""
    base = accuracy["base"]
    return {
        task: scores[task] - base[task]
        for label, scores in accuracy.items()
        if label.startswith(f"{kind}:")
        for task in [label.split(":", 1)[1]]
    }


def write_report(
    root: Path,
    config: Profile,
    tasks: list[str],
    accuracy: dict[str, dict[str, float]],
    routing: Routing,
    seconds: float,
    log: Callable[[str], None],
) -> None:
    """report.json and report.md: test accuracy of every model on every task, the own-task
    gains of the experts and LoRAs over the base, the MoE's routing per task on the test
    prompts; logs a warning for every weak expert."""
    gains = {kind: own_task_gains(accuracy, kind) for kind in ("expert", "lora")}
    weak = [
        f"{kind}:{task} ({gain:+.3f})"
        for kind, by_task in gains.items()
        for task, gain in by_task.items()
        if gain < MIN_EXPERT_GAIN
    ]
    for line in weak:
        log(f"warning: {line} beats the base on its own task by less than {MIN_EXPERT_GAIN}")
    report = {
        "profile": config.name,
        "split": "test",
        "accuracy": accuracy,
        "own_task_gain": gains,
        "weak": weak,
        "moe_routing": routing,
        "moe_task_separation": task_separation(routing),
        "build_seconds": round(seconds, 1),
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    own = {
        "base": accuracy["base"],
        "expert (own task)": {t: accuracy[f"expert:{t}"][t] for t in tasks},
        "lora (own task)": {t: accuracy[f"lora:{t}"][t] for t in tasks},
    }
    text = [
        f"# amalgam zoo, profile `{config.name}`\n",
        f"Built in {seconds:.0f} s. Test-split accuracy (%), scored like lm-eval `acc`.\n",
        "## Each expert on its own task\n",
        render_markdown(own, tasks),
        "## Every model on every task\n",
        render_markdown(accuracy, tasks),
    ]
    if weak:
        text.append(f"Experts within {MIN_EXPERT_GAIN} of the base: {', '.join(weak)}\n")
    text += [
        "## MoE routing per task\n",
        "Share (%) of the top-k slots each expert gets on the task's test prompts. Task "
        f"separation {task_separation(routing):.3f} (mean total-variation distance between "
        "two tasks' shares: 0 when every task is routed alike).\n",
        *routing_tables(routing),
    ]
    (root / "report.md").write_text("\n".join(text))
    log(f"report: {root / 'report.md'}")


def routing_tables(routing: Routing) -> list[str]:
    """One markdown table per layer: a row per task, a column per expert."""
    tables = []
    for layer in range(len(next(iter(routing.values())))):
        experts = len(next(iter(routing.values()))[layer])
        lines = [
            f"Layer {layer}:\n",
            "| task | " + " | ".join(f"E{e}" for e in range(experts)) + " |",
            "|---|" + "---:|" * experts,
        ]
        for task, layers in routing.items():
            lines.append(
                f"| {task} | " + " | ".join(f"{100 * s:.1f}" for s in layers[layer]) + " |"
            )
        tables.append("\n".join(lines) + "\n")
    return tables
