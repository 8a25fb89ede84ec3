"""Merge methods, one module per family, registered by name."""

from amalgam.merge import (  # noqa: F401  (importing a module registers its methods)
    breadcrumbs,
    continual,
    dare,
    fisher,
    linear,
    model_stock,
    opcm,
    regmean,
    slerp,
    task_arithmetic,
    ties,
)
from amalgam.merge.base import REGISTRY, Method, get_method

__all__ = ["REGISTRY", "Method", "get_method"]
