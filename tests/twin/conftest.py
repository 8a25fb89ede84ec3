"""Fixtures for the Twin-Merging tests: the tiny zoo of tests/zoo."""

from zoo.conftest import zoo_tiny

__all__ = ["zoo_tiny"]
