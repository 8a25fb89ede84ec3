"""nightly: discovers new experts, absorbs them into the champion, promotes only through gates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from recipes import nightly_config

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.pipeline_config import NightlyConfig
from amalgam.recipe import parse_recipe
from amalgam.registry import Registry
from amalgam_flows.nightly import nightly

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_nightly_absorbs_promotes_and_is_idempotent(zoo_tiny, tmp_path: Path, tracking_uri) -> None:
    drop = tmp_path / "drop"
    first = ["zoo_count", "zoo_compare"]
    for e in first:
        shutil.copytree(zoo_tiny.experts[e], drop / e)
    raw = nightly_config(
        zoo_tiny, str(drop), tracking_uri, tmp_path / "work", max_perplexity_ratio=5.0
    )
    config = NightlyConfig.model_validate(raw)

    one = nightly(config)
    assert one.status == "promoted", one.message
    assert one.new == sorted(first)
    registry = Registry(tracking_uri)
    assert registry.alias_version("zoo", "champion") == one.version

    again = nightly(config)
    assert again.status == "nothing-new"
    assert "nothing to do" in again.message

    shutil.copytree(zoo_tiny.experts["zoo_sort"], drop / "zoo_sort")
    two = nightly(config)
    assert two.new == ["zoo_sort"]
    assert two.status == "promoted", two.message
    # the same tensors as one continual merge of all three, computed here without Prefect (the
    # headers differ: they name the folders each step read)
    recipe = parse_recipe(
        {**raw["recipe"], "models": [{"uri": str(drop / e)} for e in [*sorted(first), "zoo_sort"]]}
    )
    direct = run_merge(recipe, MergeOptions(output=str(tmp_path / "direct"))).output
    with open_checkpoint(direct) as a, open_checkpoint(registry.model_path("zoo", "champion")) as b:
        assert a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name)), name
    lineage = registry.lineage("zoo", two.version)
    assert lineage.parents["champion"].hash
    assert "zoo_sort" in lineage.parents
