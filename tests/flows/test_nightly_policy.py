"""nightly promotes through the registry's policy, whatever gates its template recipe asks for
(the library's run_nightly, without Prefect)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from recipes import nightly_config

from amalgam.nightly import run_nightly
from amalgam.pipeline_config import NightlyConfig
from amalgam.recipe import Gates
from amalgam.registry import Registry

pytestmark = pytest.mark.slow


def test_nightly_promotes_by_the_registry_policy_not_its_recipe_gates(
    zoo_tiny, tmp_path: Path, tracking_uri: str
) -> None:
    drop = tmp_path / "drop"
    shutil.copytree(zoo_tiny.experts["zoo_count"], drop / "zoo_count")
    registry = Registry(tracking_uri)
    # an operator's policy before the first night: a floor no candidate reaches
    registry.set_policy("zoo", Gates(task_floor=10.0, floor_metric="accuracy"))
    config = NightlyConfig.model_validate(
        nightly_config(zoo_tiny, str(drop), tracking_uri, tmp_path / "work")  # `gates: {}`
    )
    assert config.template.register.gates == Gates()

    held = run_nightly(config)
    assert held.status == "held", held.message
    assert held.failures and all(
        f.startswith("task_floor: task ") and f.endswith("< floor 10.0 (registry policy)")
        for f in held.failures
    )
    assert registry.alias_version("zoo", "champion") is None
    assert registry.policy("zoo").gates.task_floor == 10.0  # not replaced by `{}`

    again = run_nightly(config)  # same champion, same policy: not evaluated again
    assert again.status == "nothing-new" and again.version == held.version, again.message

    # the operator lowers the policy: the candidate held under the old one is checked again
    registry.set_policy("zoo", Gates(max_perplexity_ratio=5.0))
    promoted = run_nightly(config)
    assert promoted.status == "promoted", promoted.message
    assert promoted.version == held.version
    assert registry.alias_version("zoo", "champion") == held.version
