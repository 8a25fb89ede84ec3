"""Coordinate descent over permutation groups (Git Re-Basin, arXiv 2209.04836), shared by
weight matching (the tensors are weights) and activation matching (the tensors are
standardised activations, so inner products are correlations).

API (stable): ``coordinate_descent(groups, axes, ref, model, seed=, max_iter=)`` where
``axes`` maps a tensor name to its permuted axes (``AxisMap``) and ``ref(name)`` /
``model(name)`` return float tensors. Each step solves one group by
``scipy.optimize.linear_sum_assignment`` (maximised) with every other group's current
permutation applied; groups are visited in a seeded random order, each again only once a
group it shares a tensor with has changed, until none is left to solve. A leaf level (units)
is scored by inner products; a block level (KV groups, heads: units with sub-units inside) by
``||A_i B_j^T||_F^2`` over the blocks' rows, which does not depend on how the sub-units are
ordered, so heads are matched as blocks before their dims."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from amalgam.align.permutation.apply import Perms, axis_index, identity
from amalgam.align.permutation.spec import AxisMap, Group

Tensors = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Use:
    """Level ``depth`` of axis ``axis_map`` of tensor ``name`` is permuted by a group."""

    name: str
    axis_map: AxisMap
    depth: int


def uses_of(axes: Mapping[str, list[AxisMap]]) -> dict[str, list[Use]]:
    """group -> every (tensor, axis, level) it permutes."""
    uses: dict[str, list[Use]] = {}
    for name, maps in axes.items():
        for axis_map in maps:
            for depth, level in enumerate(axis_map.levels):
                if level.group is not None:
                    uses.setdefault(level.group, []).append(Use(name, axis_map, depth))
    return uses


def children_of(
    axes: Mapping[str, list[AxisMap]], groups: Mapping[str, Group]
) -> dict[str, set[str]]:
    """outer group -> the groups holding one sub-permutation per slot of it."""
    children: dict[str, set[str]] = {}
    for maps in axes.values():
        for axis_map in maps:
            outer = axis_map.levels[0].group
            for level in axis_map.levels[1:]:
                if outer and level.group and groups[level.group].count > 1:
                    children.setdefault(outer, set()).add(level.group)
    return children


def _permuted(
    tensor: torch.Tensor, maps: list[AxisMap], perms: Perms, skip: Use, free: str
) -> torch.Tensor:
    """``tensor`` with ``perms`` applied on every axis, but ``free`` left in place on the
    skipped use's axis."""
    for axis_map in maps:
        chosen = perms
        if axis_map is skip.axis_map:
            chosen = {**perms, free: identity(*perms[free].shape)}
        tensor = tensor.index_select(axis_map.axis, axis_index(axis_map, chosen))
    return tensor


def group_cost(
    group: str,
    spec_group: Group,
    uses: list[Use],
    axes: Mapping[str, list[AxisMap]],
    ref: Tensors,
    model: Tensors,
    perms: Perms,
) -> torch.Tensor:
    """(count, size, size) similarity of reference unit i and model unit j of each slot."""
    cost = torch.zeros(spec_group.count, spec_group.size, spec_group.size, dtype=torch.float64)
    for use in uses:
        sizes = [lv.size for lv in use.axis_map.levels]
        inner = math.prod(sizes[use.depth + 1 :])
        shape = (math.prod(sizes[: use.depth]), sizes[use.depth], inner, -1)
        a = ref(use.name).float().movedim(use.axis_map.axis, 0).reshape(shape)
        m = _permuted(model(use.name).float(), axes[use.name], perms, use, group)
        b = m.movedim(use.axis_map.axis, 0).reshape(shape)
        if inner == 1:
            per_slot = torch.einsum("oir,ojr->oij", a[:, :, 0], b[:, :, 0])
        else:
            per_slot = torch.einsum("oipr,ojqr->oijpq", a, b).square().sum((-2, -1))
        if spec_group.count == 1:
            cost[0] += per_slot.sum(0)
        else:  # sub-permutations: one per slot of the first level
            cost += per_slot.reshape(sizes[0], -1, *per_slot.shape[1:]).sum(1)
    return cost


def coordinate_descent(
    groups: Mapping[str, Group],
    axes: Mapping[str, list[AxisMap]],
    ref: Tensors,
    model: Tensors,
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[Perms, int]:
    """(permutations of ``model`` onto ``ref``, passes run). A group is solved again only
    when a group sharing a tensor with it has changed since (MLP groups of a model without
    the residual group are solved once)."""
    uses = uses_of(axes)
    names = sorted(g for g in groups if g in uses)
    children = children_of(axes, groups)
    neighbours = _neighbours(axes)
    perms: Perms = {n: identity(g.count, g.size) for n, g in groups.items()}
    order = random.Random(seed)
    stale = set(names)
    for passes in range(1, max_iter + 1):
        order.shuffle(names)
        for name in names:
            if name not in stale:
                continue
            stale.discard(name)
            cost = group_cost(name, groups[name], uses[name], axes, ref, model, perms)
            old = perms[name]
            new = torch.stack(
                [torch.as_tensor(linear_sum_assignment(c.numpy(), maximize=True)[1]) for c in cost]
            )
            gain = _score(cost, new) - _score(cost, old)
            if gain <= 1e-12 * max(1.0, abs(_score(cost, old))):
                continue
            perms[name] = new
            stale |= neighbours[name]
            for child in children.get(name, ()):  # sub-permutations follow their slot
                perms[child] = perms[child][torch.argsort(old[0])[new[0]]]
                stale |= neighbours[child]
        if not stale:
            return perms, passes
    return perms, max_iter


def _neighbours(axes: Mapping[str, list[AxisMap]]) -> dict[str, set[str]]:
    """group -> the groups whose permutations its cost reads: every group on a tensor it
    permutes, itself only where it permutes two places of one tensor."""
    out: dict[str, set[str]] = {}
    for maps in axes.values():
        places = [lv.group for m in maps for lv in m.levels if lv.group is not None]
        for group in places:
            out.setdefault(group, set()).update(g for g in places if g != group)
            if places.count(group) > 1:
                out[group].add(group)
    return out


def _score(cost: torch.Tensor, perm: torch.Tensor) -> float:
    return float(cost.gather(2, perm.unsqueeze(2)).sum())


def is_identity(perms: Perms) -> bool:
    """Whether every group is left in place."""
    return all(torch.equal(p, identity(*p.shape)) for p in perms.values())
