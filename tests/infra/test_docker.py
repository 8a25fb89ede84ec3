"""infra/docker/Dockerfile: hadolint clean, pinned base and torch, non-root, no secrets, and a
build context that holds what the Dockerfile copies and nothing else."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.infra.tools import DOCKERFILE, ROOT, binary, pyproject_pin


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_hadolint_clean() -> None:
    hadolint = binary("hadolint")
    run = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_base_images_and_torch_are_pinned() -> None:
    bases = [args.split()[0] for op, args in instructions() if op == "FROM"]
    assert len(bases) == 2, "a build stage and a runtime stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    args = dict(a.split("=", 1) for op, a in instructions() if op == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pyproject_pin("torch")
    assert args["VARIANT"] == "cpu"
    build = DOCKERFILE.read_text()
    assert "cpu) pip install" in build and "cuda) pip install" in build


def test_runs_as_a_non_root_user() -> None:
    users = [args for op, args in instructions() if op == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, users[-1]


def test_no_secret_in_the_image() -> None:
    for op, args in instructions():
        if op in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"(\w+)=", args)
            for name in names:
                assert not re.search(r"SECRET|PASSWORD|ACCESS_KEY|API_KEY|_TOKEN\b", name), name
    healthcheck = [args for op, args in instructions() if op == "HEALTHCHECK"]
    assert healthcheck == ["NONE"]  # justified in the Dockerfile: Kubernetes probes each role


def test_build_context_holds_what_is_copied_and_no_local_state() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "**", "an allow-list: everything is excluded first"

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negated = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negated
        return keep

    for op, args in instructions():
        if op == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert included(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    for state in (".venv", ".amalgam", ".venv-checkov", "terraform", ".git"):
        assert not included(state), state


def test_the_project_installs_whole_from_what_the_image_copies(tmp_path: Path) -> None:
    """The build stage copies a few paths and installs a wheel of them: every file of the three
    packages must be in it (a folder without __init__.py or a data file left out would be
    missing in the pods), with the `amalgam` command."""
    src = tmp_path / "src"
    src.mkdir()
    build_stage = instructions()[: [op for op, _ in instructions()].index("FROM", 1)]
    for op, args in build_stage:
        if op == "COPY":
            for source in args.split()[:-1]:
                if (ROOT / source).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(ROOT / source, src / source, ignore=ignore)
                else:
                    shutil.copy(ROOT / source, src / source)
    wheels = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    run = subprocess.run(
        [*pip, "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_NO_INDEX": "1"},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = wheels.glob("amalgam-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "amalgam = amalgam_flows.cli:entry" in entry_points
    installed = {"amalgam": "amalgam", "flows": "amalgam_flows", "tasks": "amalgam_stage_tasks"}
    for folder, package in installed.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(ROOT / folder).as_posix()
                assert f"{package}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
