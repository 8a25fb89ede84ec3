"""docs/scale-out.md stays true to the files it describes: its recipes parse, the terraform
outputs and repository paths it names exist."""

from __future__ import annotations

import re

import yaml

from amalgam.recipe import parse_recipe
from tests.infra.tools import ROOT, TERRAFORM, named, parse_module

DOC = ROOT / "docs" / "scale-out.md"


def test_its_recipes_are_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    recipes = [yaml.safe_load(b) for b in blocks if b.startswith("method:")]
    assert recipes
    for data in recipes:
        recipe = parse_recipe(data, "docs/scale-out.md")
        assert recipe.output and recipe.output.startswith("s3://")


def test_the_outputs_and_paths_it_names_exist() -> None:
    text = DOC.read_text()
    outputs = set(named(parse_module(TERRAFORM), "output"))
    table = text[text.index("| output | example | use |") :].split("\n\n", 1)[0]
    named_outputs = set(re.findall(r"^\| `(\w+)`", table, re.M))
    named_outputs |= set(re.findall(r"`(\w+)`, `(\w+)`, `(\w+)` \|", table)[0])
    named_outputs |= set(re.findall(r"output -raw (\w+)", text))
    assert named_outputs <= outputs, named_outputs - outputs
    # configs/ paths are files the reader writes; the rest must be in the repository
    for path in set(re.findall(r"`((?:terraform|infra|docs)/[\w./-]+)`", text)):
        assert (ROOT / path).exists(), path
