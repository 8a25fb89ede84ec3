"""The align stage: for now a compatibility check of the inputs (names, shapes, vocabulary)."""

from amalgam.align.compatibility import (
    CompatibilityError,
    CompatibilityReport,
    Problem,
    check_compatibility,
    run_align,
    tensor_problems,
)

__all__ = [
    "CompatibilityError",
    "CompatibilityReport",
    "Problem",
    "check_compatibility",
    "run_align",
    "tensor_problems",
]
