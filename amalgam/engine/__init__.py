"""The merge engine: plan a recipe into passes (data statistics, whole-model statistics,
continual steps, tensors) and run them, locally or on Ray (see ``run``, ``plan``, ``execute``)."""

from amalgam.engine.inputs import check_output, open_recipe_inputs, plan_recipe
from amalgam.engine.options import MergeOptions, MergeResult, output_of
from amalgam.engine.plan import Plan
from amalgam.engine.run import run_merge

__all__ = [
    "MergeOptions",
    "MergeResult",
    "Plan",
    "check_output",
    "open_recipe_inputs",
    "output_of",
    "plan_recipe",
    "run_merge",
]
