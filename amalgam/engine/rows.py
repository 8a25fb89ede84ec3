"""Rows only some models own (vocabulary union): the merge plan groups each such tensor's rows
by the set of models that own them, and each group is merged over its owners only; a row one
model owns is copied from it. The base's row (its own, or the aligner's fill) stands in as the
base everywhere."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from amalgam.align.vocab.ownership import ROWS_FILE, mask_ranges, read_ownership
from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError

#: (input row blocks, base first when the plan has one; owners as model indices) -> merged rows
MergeRows = Callable[[list[torch.Tensor], tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class RowGroup:
    """The rows (``[start, stop)`` ranges) owned by exactly the models ``owners`` (indices
    among the plan's models, base excluded)."""

    owners: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The group's rows of ``t`` (a view when they are one range)."""
        if len(self.ranges) == 1:
            return t[self.ranges[0][0] : self.ranges[0][1]]
        return t.index_select(0, torch.cat([torch.arange(a, b) for a, b in self.ranges]))

    def put(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` into the group's rows of ``out``."""
        start = 0
        for a, b in self.ranges:
            out[a:b] = rows[start : start + b - a]
            start += b - a


def row_groups(inputs: dict[str, Checkpoint], has_base: bool) -> dict[str, tuple[RowGroup, ...]]:
    """Tensor name -> its row groups, for the tensors some model owns only part of (read from
    the inputs' ownership sidecars; an input without one owns every row)."""
    models = list(inputs.values())[1 if has_base else 0 :]
    owned = [None if c.kind == "file" else read_ownership(c.fs, c.root) for c in models]
    names = sorted({n for o in owned if o is not None for n in o.tensors})
    groups: dict[str, tuple[RowGroup, ...]] = {}
    for name in names:
        rows = next(c.shape(name)[0] for c in models if name in c.tensors)
        masks = []
        for c, o in zip(models, owned, strict=True):
            if o is not None and name in o.tensors and o.rows != rows:
                raise PlanError(
                    f"{c.uri}/{ROWS_FILE}: {o.rows} rows of '{name}', the tensor has {rows}"
                )
            has = o is not None and name in o.tensors
            masks.append(o.mask() if has else torch.ones(rows, dtype=torch.bool))
        stacked = torch.stack(masks, dim=1)  # rows x models: who owns each row
        if bool(stacked.all()):
            continue
        sets, which = torch.unique(stacked, dim=0, return_inverse=True)
        out = []
        for k, owners_mask in enumerate(sets.tolist()):
            owners = tuple(i for i, owns in enumerate(owners_mask) if owns)
            out.append(RowGroup(owners or tuple(range(len(models))), mask_ranges(which == k)))
        groups[name] = tuple(out)
    return groups


def merge_by_rows(
    groups: Sequence[RowGroup], raw: list[torch.Tensor], has_base: bool, merge: MergeRows
) -> torch.Tensor:
    """One tensor merged group by group (float32): a group one model owns is copied from it,
    any other is ``merge`` over its owners' rows (and the base's)."""
    models = raw[1:] if has_base else raw
    out = torch.empty(raw[0].shape, dtype=torch.float32)
    for g in groups:
        if len(g.owners) == 1:
            part = g.take(models[g.owners[0]])
        else:
            base = [g.take(raw[0])] if has_base else []
            part = merge(base + [g.take(models[i]) for i in g.owners], g.owners)
        g.put(out, part.float().cpu())
    return out
