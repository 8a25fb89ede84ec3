"""Fixtures for the evaluation tests: the tiny and MiniLM zoos of tests/zoo."""

from zoo.conftest import zoo_minilm, zoo_tiny

__all__ = ["zoo_minilm", "zoo_tiny"]
