"""Where tests/infra finds its linters, and the parsed files they check.

``make install`` puts python-hcl2, kubernetes-validate, prefect-kubernetes, hadolint and
yamllint into the project's venv (the ``infra`` extra); ``make test`` builds checkov's own venv
(``.venv-checkov``: checkov pins an old boto3 and ships a module named ``hcl2`` that would
shadow python-hcl2). Outside CI a missing tool skips its test with the command that installs
it; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "terraform"
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
INSTALL = "make install (the project's infra extra: pip install -e '.[test,infra]')"


def missing(what: str, how: str) -> NoReturn:
    """Fail in CI, skip elsewhere: a linter CI must have, absent on a developer's machine."""
    message = f"{what} is not installed; {how}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"the Python module {name}", INSTALL)


def binary(name: str, env: str | None = None, venv: Path | None = None) -> Path:
    """A linter's executable: ``$env`` if set, then ``venv/bin``, next to this Python, PATH."""
    candidates = [os.environ.get(env) if env else None]
    if venv is not None:
        candidates.append(str(venv / "bin" / name))
    candidates += [str(Path(sys.executable).parent / name), shutil.which(name)]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    missing(name, "make test builds it" if venv is not None else INSTALL)


def unquote(value: Any) -> Any:
    """python-hcl2 keeps string literals' quotes ('"x"'); strip them, recursively."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


def tf_files() -> list[Path]:
    return sorted(p for p in TERRAFORM.rglob("*.tf") if ".terraform" not in p.parts)


def tf_modules() -> list[Path]:
    """Every folder holding .tf files: the root module and each module under modules/."""
    return sorted({p.parent for p in tf_files()})


def parse_module(folder: Path) -> dict[str, list[Any]]:
    """Every top-level block of a module's .tf files, merged by kind (resource, variable...)."""
    hcl2 = module("hcl2")
    blocks: dict[str, list[Any]] = {}
    for path in sorted(folder.glob("*.tf")):
        with path.open() as f:
            parsed = hcl2.load(f)
        for kind, items in parsed.items():
            if not kind.startswith("__"):
                blocks.setdefault(kind, []).extend(unquote(items))
    return blocks


def named(blocks: dict[str, list[Any]], kind: str) -> dict[str, dict[str, Any]]:
    """``variable "x" {...}`` blocks (or outputs, modules) by name."""
    return {name: body for item in blocks.get(kind, []) for name, body in item.items()}


def resources(
    blocks: dict[str, list[Any]], rtype: str, kind: str = "resource"
) -> dict[str, dict[str, Any]]:
    """The resources (or, with ``kind="data"``, data sources) of one type in a module, by name."""
    out: dict[str, dict[str, Any]] = {}
    for item in blocks.get(kind, []):
        for t, by_name in item.items():
            if t == rtype:
                out.update(by_name)
    return out


def all_resources(rtype: str) -> dict[str, dict[str, Any]]:
    """The resources of one type in every module, keyed ``module-folder:name``."""
    return {
        f"{folder.relative_to(TERRAFORM)}:{name}": body
        for folder in tf_modules()
        for name, body in resources(parse_module(folder), rtype).items()
    }


def pyproject_pin(package: str) -> str:
    """The ``==`` version pyproject.toml pins ``package`` to."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', text)
    assert match, f"pyproject.toml pins no {package}"
    return match.group(1)
