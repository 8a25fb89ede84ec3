"""Merge methods, one module per family, registered by name."""

from amalgam.merge import (  # noqa: F401  (importing a module registers its methods)
    breadcrumbs,
    consensus,
    continual,
    dare,
    fisher,
    linear,
    model_stock,
    opcm,
    pcb,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from amalgam.merge.base import REGISTRY, Method, get_method

__all__ = ["REGISTRY", "Method", "get_method"]
