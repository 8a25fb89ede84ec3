"""The layering rules of docs/architecture.md, read from the source (AST) of every module.

- the library (``amalgam/``) never imports Prefect or the orchestration packages;
- no Prefect-task module imports another one, no flow module imports another flow module
  (``flows/cli.py``, the orchestration command line, is the one module that calls flows);
- no import cycle among the library's modules, counting imports inside functions;
- an import inside a function says why it is lazy (a ``lazy:`` comment on its line or just
  above its block of imports): only heavy or optional dependencies are imported late.
Imports under ``if TYPE_CHECKING:`` are never run and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package name it is installed under (setup.py's package_dir)
PACKAGES = {"amalgam": "amalgam", "flows": "amalgam_flows", "tasks": "amalgam_stage_tasks"}
ORCHESTRATION = {"prefect", "prefect_ray", "flows", "tasks", *list(PACKAGES.values())[1:]}
FLOW_CALLER = "amalgam_flows.cli"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (a submodule when ``from package import submodule``)
    line: int
    in_function: bool
    reason: str  # the text of a ``lazy:`` comment, or ""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


KNOWN = modules()


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def lazy_reason(lines: list[str], node: ast.stmt) -> str:
    """The ``lazy:`` comment on the import's lines, or on the comment or import lines just
    above it (one comment may explain a block of imports)."""
    block = lines[node.lineno - 1 : node.end_lineno]
    i = node.lineno - 2
    while i >= 0 and (
        not lines[i].strip() or lines[i].strip().startswith(("#", "from ", "import "))
    ):
        block.insert(0, lines[i])
        i -= 1
    text = " ".join(block)
    return text.split("lazy:", 1)[1].strip() if "lazy:" in text else ""


def type_only(tree: ast.Module) -> set[int]:
    """Ids of the imports under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    return {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }


def imports(module: str, path: Path) -> Iterator[Import]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    skipped = type_only(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or id(node) in skipped:
            continue
        reason = lazy_reason(lines, node)
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = resolve(node, module, path.name == "__init__.py")
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in KNOWN]
            targets = subs or [base]
        for target in targets:
            yield Import(module, target, node.lineno, id(node) in inside, reason)


ALL = [i for m, p in KNOWN.items() for i in imports(m, p)]


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_library_never_imports_orchestration() -> None:
    bad = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL
        if top(i.module) == "amalgam" and top(i.target) in ORCHESTRATION
    ]
    assert not bad, bad


@pytest.mark.parametrize("package", ["amalgam_stage_tasks", "amalgam_flows"])
def test_no_orchestration_module_imports_a_sibling(package: str) -> None:
    siblings = {m for m in KNOWN if top(m) == package and m != package}
    bad = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL
        if i.module in siblings and i.module != FLOW_CALLER and i.target in siblings
    ]
    assert not bad, bad
    assert not [i for i in ALL if top(i.target) in {"flows", "tasks"}], "use the installed names"


def test_no_import_cycle_in_the_library() -> None:
    graph: dict[str, set[str]] = {m: set() for m in KNOWN if top(m) == "amalgam"}
    for i in ALL:
        if i.module in graph and i.target in graph and i.target != i.module:
            graph[i.module].add(i.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return [*path[path.index(t) :], t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_imports_inside_functions_say_why() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in ALL if i.in_function and not i.reason]
    assert not bad, "an import inside a function needs a 'lazy: <reason>' comment:\n" + "\n".join(
        bad
    )
