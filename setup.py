"""Package layout only (dependencies and metadata live in pyproject.toml): the library
``amalgam`` and the orchestration folders ``flows/`` and ``tasks/``, installed under names that
cannot collide with other projects' top-level ``flows``/``tasks`` (docs/architecture.md)."""

from setuptools import find_packages, setup

ORCHESTRATION = {"amalgam_flows": "flows", "amalgam_stage_tasks": "tasks"}

setup(
    packages=[*find_packages(include=["amalgam", "amalgam.*"]), *ORCHESTRATION],
    package_dir=ORCHESTRATION,
)
