"""Fixtures for the engine tests: the tiny zoo of tests/zoo (stacked real models)."""

from zoo.conftest import zoo_tiny

__all__ = ["zoo_tiny"]
