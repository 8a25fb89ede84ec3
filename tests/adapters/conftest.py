"""Fixtures for the adapter tests: the tiny zoo of tests/zoo (its LoRA adapters)."""

from zoo.conftest import zoo_tiny

__all__ = ["zoo_tiny"]
