"""The layers' import rules: the library never reaches up into Prefect, tasks or flows; a task
never imports a task, a flow never a flow."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    """Top-level package.module names ``path`` imports, in functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_library_never_imports_prefect_tasks_or_flows() -> None:
    bad = {
        f"{p.relative_to(REPO)}: {name}"
        for p in (REPO / "amalgam").rglob("*.py")
        if p.name != "cli.py"  # the CLI's flow commands move out of the library separately
        for name in imported(p)
        if name.split(".")[0] in {"prefect", "prefect_ray", "tasks", "flows"}
    }
    assert not bad


def test_no_task_imports_a_task_and_no_flow_imports_a_flow() -> None:
    for layer in ("tasks", "flows"):
        bad = {
            f"{p.relative_to(REPO)}: {name}"
            for p in (REPO / layer).glob("*.py")
            for name in imported(p)
            if name.split(".")[0] == layer
        }
        assert not bad, layer
