"""Evaluation of models on local task folders: lm-eval offline, a fast in-process scorer, tables."""

from amalgam.evaluate.harness import evaluate_model
from amalgam.evaluate.quick import choice_accuracy, quick_evaluate
from amalgam.evaluate.table import render_markdown, render_table
from amalgam.evaluate.taskdir import EvaluationError, list_tasks, read_split

__all__ = [
    "EvaluationError",
    "choice_accuracy",
    "evaluate_model",
    "list_tasks",
    "quick_evaluate",
    "read_split",
    "render_markdown",
    "render_table",
]
