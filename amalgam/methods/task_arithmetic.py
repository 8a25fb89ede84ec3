"""Task arithmetic: base plus scaled sum of task vectors (arXiv 2212.04089)."""

from __future__ import annotations

from functools import partial

from amalgam.methods.accumulate import TaskVectorSum
from amalgam.methods.base import Method, register
from amalgam.methods.task_vectors import LAMBDA, WEIGHT, normalize_param, task_vector_merge

register(
    Method(
        name="task_arithmetic",
        fn=partial(task_vector_merge, None, False),
        accumulate=partial(TaskVectorSum, None, False),
        params=(WEIGHT, LAMBDA, normalize_param(False)),
        summary="W0 + lambda * sum_i w_i (W_i - W0); negative weights subtract a task",
        paper="arXiv 2212.04089",
    )
)
