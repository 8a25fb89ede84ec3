"""Permutations applied: gather indices per tensor axis, permuted copies written tensor by
tensor, random valid permutations, and the permutation artifact.

API (stable): ``identity(count, size)``, ``identity_perms(spec)``, ``random_perms(spec, seed)``,
``permute_tensor(spec, perms, name, tensor)``, ``axis_index(axis_map, perms)``,
``write_permuted(ckpt, output, spec, perms)``, ``permuted_copy(uri, output, seed)``,
``save_perms(uri, spec, perms)`` / ``load_perms(uri, spec)``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load, save

from amalgam import storage
from amalgam.adapters.open import open_input
from amalgam.align.copies import write_aligned_copy
from amalgam.align.permutation.spec import AxisMap, PermSpec, derive_spec
from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError

#: group name -> int64 tensor (count, size); new unit i of slot b is old unit perm[b, i].
Perms = dict[str, torch.Tensor]


def identity(count: int, size: int) -> torch.Tensor:
    """``count`` permutations of ``size`` units that leave every unit in place."""
    return torch.arange(size).repeat(count, 1)


def identity_perms(spec: PermSpec) -> Perms:
    """Every group left in place."""
    return {name: identity(g.count, g.size) for name, g in spec.groups.items()}


def random_perms(spec: PermSpec, seed: int) -> Perms:
    """A random valid permutation of every group, the same for the same seed and spec."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.stack([torch.randperm(g.size, generator=gen) for _ in range(g.count)])
        for name, g in sorted(spec.groups.items())
    }


def axis_index(axis_map: AxisMap, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The gather index of one axis: entry ``j`` of the new axis is entry ``index[j]`` of the
    old one. A sub-permutation (count > 1) is picked by the new slot of the first level."""
    sizes = [lv.size for lv in axis_map.levels]
    index = torch.zeros(sizes, dtype=torch.long)
    stride = 1
    for depth in range(len(sizes) - 1, -1, -1):
        group = axis_map.levels[depth].group
        shape = [1] * len(sizes)
        shape[depth] = sizes[depth]
        if group is None:
            old = torch.arange(sizes[depth]).view(shape)
        elif perms[group].shape[0] == 1:
            old = perms[group][0].view(shape)
        else:  # one permutation per (new) slot of the first level
            shape[0] = sizes[0]
            old = perms[group].view(shape)
        index = index + old * stride
        stride *= sizes[depth]
    return index.reshape(-1)


def permute_tensor(
    spec: PermSpec, perms: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor
) -> torch.Tensor:
    """``tensor`` (named ``name``) with every permuted axis gathered."""
    for axis_map in spec.axes.get(name, ()):
        tensor = tensor.index_select(axis_map.axis, axis_index(axis_map, perms))
    return tensor


def write_permuted(
    ckpt: Checkpoint, output: str, spec: PermSpec, perms: Perms, **storage_options: Any
) -> str:
    """Write ``ckpt`` permuted by ``perms`` to ``output`` (streamed, committed)."""
    return write_aligned_copy(
        ckpt,
        output,
        lambda name, tensor: permute_tensor(spec, perms, name, tensor),
        **storage_options,
    )


def permuted_copy(
    uri: str, output: str, seed: int, *, residual: bool = False, **storage_options: Any
) -> str:
    """A copy of the model at ``uri`` with every group (and the residual stream when
    ``residual``) randomly permuted by ``seed``: the same function, another basis."""
    with open_input(uri, **storage_options) as ckpt:
        spec = derive_spec(ckpt, residual=residual)
        return write_permuted(ckpt, output, spec, random_perms(spec, seed), **storage_options)


def save_perms(uri: str, spec: PermSpec, perms: Perms, **storage_options: Any) -> None:
    """Write the permutations as ``uri`` (safetensors of index tensors) and the spec next to
    it (``<uri>.json``)."""
    fs, path = storage.resolve(uri, **storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path + ".json", "w") as fh:
        json.dump(spec.to_json(), fh, indent=1)
    with fs.open(path + ".partial", "wb") as fh:
        fh.write(save({name: p.contiguous() for name, p in perms.items()}))
    fs.mv(path + ".partial", path)


def load_perms(uri: str, spec: PermSpec, **storage_options: Any) -> Perms | None:
    """The permutations saved at ``uri`` for ``spec``, or None when absent or for another
    spec."""
    fs, path = storage.resolve(uri, **storage_options)
    if not (fs.exists(path) and fs.exists(path + ".json")):
        return None
    with fs.open(path + ".json") as fh:
        if json.load(fh) != json.loads(json.dumps(spec.to_json())):
            return None
    with fs.open(path, "rb") as fh:
        perms = load(fh.read())
    for name, group in spec.groups.items():
        if name not in perms or tuple(perms[name].shape) != (group.count, group.size):
            raise PlanError(f"{uri}: permutation {name} missing or of the wrong shape")
    return perms
