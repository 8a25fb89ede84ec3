"""Merge methods, one module per family, registered by name.

Importing the package imports every module in it, and each method module registers its methods:
a new method is one new file here.
"""

import importlib
import pkgutil

from amalgam.methods.base import REGISTRY, Method, get_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Method", "get_method"]
