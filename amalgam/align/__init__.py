"""The align stage: a compatibility check of the inputs (names, shapes, vocabulary), and the
methods that write aligned copies (vocabulary union, permutation alignment)."""

from amalgam.align.compatibility import (
    CompatibilityError,
    CompatibilityReport,
    Problem,
    check_compatibility,
    check_inputs,
    tensor_problems,
)
from amalgam.align.run import run_align

__all__ = [
    "CompatibilityError",
    "CompatibilityReport",
    "Problem",
    "check_compatibility",
    "check_inputs",
    "run_align",
    "tensor_problems",
]
