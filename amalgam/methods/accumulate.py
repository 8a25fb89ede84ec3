"""Merging one tensor one model at a time: what the engine streams a tensor with when the
inputs of every model at once would exceed its memory budget (docs/architecture.md, Memory).

A method that can merge this way declares ``Method.accumulate``: a factory taking (base in its
stored dtype or None, the tensor's parameters, its context) and returning an
:class:`Accumulator`. The engine reads the models in plan order, ``passes`` times over, and
hands each to ``add`` on its own, so at most a model or two are held besides the accumulator's
float32 buffers, whatever the number of models.

Every entry goes through the same float32 operations, in the same model order and on the same
row blocks (``sparsify.row_chunks``), as the method's all-at-once function: the bytes are the
same on either path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from amalgam.methods.base import MergeContext, TensorParams
from amalgam.methods.sparsify import as_rows, row_chunks
from amalgam.methods.task_vectors import (
    Applier,
    Sparsifier,
    TaskVector,
    add_agreeing,
    add_vote,
    normalize_mixed,
)


class Accumulator(Protocol):
    """One tensor's merge fed one model at a time: ``add(i, x)`` for every model i in order,
    then ``end_pass()``, ``passes`` times; then ``finish()`` returns the float32 result."""

    passes: int

    def add(self, i: int, x: torch.Tensor) -> None: ...

    def end_pass(self) -> None: ...

    def finish(self) -> torch.Tensor: ...


AccumulatorFactory = Callable[[torch.Tensor | None, TensorParams, MergeContext], Accumulator]


class WeightedSum:
    """``linear`` one model at a time: sum_i w_i x_i block by block, then / the weight sum."""

    passes = 1

    def __init__(self, weights: list[float], total: float | None):
        self.weights, self.total = weights, total  # total None: no normalization
        self.out: torch.Tensor | None = None
        self.shape: torch.Size | None = None

    def add(self, i: int, x: torch.Tensor) -> None:
        rows = as_rows(x)
        if self.out is None:
            self.out = torch.zeros(rows.shape, dtype=torch.float32, device=x.device)
            self.shape = x.shape
        for r in row_chunks(*rows.shape):
            self.out[r].add_(rows[r], alpha=self.weights[i])

    def end_pass(self) -> None:
        pass

    def finish(self) -> torch.Tensor:
        assert self.out is not None and self.shape is not None, "no model was added"
        if self.total is not None:
            for r in row_chunks(*self.out.shape):
                self.out[r] /= self.total
        return self.out.reshape(self.shape)


class TaskVectorSum:
    """``task_vector_merge`` one model at a time.

    Without sign election, one pass: each model's (sparsified) task vector is added into the
    float32 sum. With it (TIES family), two passes: the first adds each model's vote into the
    votes and keeps its sparsifier (a threshold, a random stream), the second adds the
    agreeing entries into the sum and the divisor. Held besides the inputs: the votes, then
    the elected signs (int8), the sum and the divisor.
    """

    def __init__(
        self,
        sparsify: Sparsifier | None,
        consensus: bool,
        base: torch.Tensor | None,
        p: TensorParams,
        ctx: MergeContext,
    ):
        if base is None:
            raise ValueError("task-vector methods need a base")  # the planner ensures one
        self.b, self.shape = as_rows(base), base.shape
        self.sparsify, self.p, self.ctx = sparsify, p, ctx
        self.weights = p.each("weight")
        self.vote = p.shared["consensus"] if consensus else None
        self.passes = 2 if consensus else 1
        self.pass_index = 0
        self.appliers: list[Applier | None] = [None] * len(p.per_model)
        self.chunks = row_chunks(*self.b.shape)
        # the votes in a TIES family's first pass, else the weighted sum
        self.acc = torch.zeros(self.b.shape, dtype=torch.float32, device=base.device)
        self.elected: torch.Tensor | None = None
        self.divisor: torch.Tensor | None = None

    def deltas(self, i: int, x: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """Model i's sparsified task vector, row block by row block."""
        xs = as_rows(x)
        if self.pass_index == 0 and self.sparsify is not None:
            task_vector = TaskVector(xs, self.b, self.b.float)
            self.appliers[i] = self.sparsify(task_vector, i, self.p, self.ctx)
        f = self.appliers[i]
        for rows in self.chunks:
            d = torch.sub(xs[rows], self.b[rows].float())
            yield rows, d if f is None else f(d, rows)

    def add(self, i: int, x: torch.Tensor) -> None:
        w = self.weights[i]
        if self.vote is None:
            for rows, d in self.deltas(i, x):
                self.acc[rows].add_(d, alpha=w)
        elif self.pass_index == 0:
            for rows, d in self.deltas(i, x):
                add_vote(self.acc[rows], d, w, self.vote)
        elif w != 0:  # a zero weight never agrees
            assert self.elected is not None and self.divisor is not None
            for rows, d in self.deltas(i, x):
                add_agreeing(self.acc[rows], self.divisor[rows], d, w, self.elected[rows])

    def end_pass(self) -> None:
        if self.vote is not None and self.pass_index == 0:
            # a zero vote elects +1; +-1 fits int8, and d * elected is the same product
            self.elected = self.acc.sign_().add_(0.5).sign_().to(torch.int8)
            self.acc = torch.zeros_like(self.acc)
            self.divisor = torch.zeros_like(self.acc)
        self.pass_index += 1

    def finish(self) -> torch.Tensor:
        normalize, lam = self.p.shared["normalize"], self.p.shared["lambda"]
        total = sum(self.weights)
        for rows in self.chunks:
            mixed = self.acc[rows]
            if normalize:
                divisor = total if self.divisor is None else self.divisor[rows]
                normalize_mixed(mixed, divisor, self.weights)
            torch.add(self.b[rows].float(), mixed, alpha=lam, out=mixed)
        self.elected = self.divisor = None
        return self.acc.reshape(self.shape)
