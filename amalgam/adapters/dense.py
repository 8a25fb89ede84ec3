"""One base tensor with an adapter merged in, as PEFT's ``merge_and_unload`` computes it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from amalgam.adapters.layout import Patch


def apply_patch(
    w0: torch.Tensor, patch: Patch, read: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """``W0 + scale * B @ A`` in float32 (``B @ A`` transposed for ``fan_in_fan_out`` layers and
    embeddings), cast back to ``w0``'s dtype; ``read`` reads an adapter tensor by name.

    DoRA (arXiv 2402.09353, PEFT's ``DoraLinearVariant.merge_unsafe``): the merged weight is
    rescaled per output row by ``magnitude / ||W0 + scale * B @ A||`` (the row norm of the
    unmerged weight plus the delta, rows being output features).
    """
    delta = read(patch.b).float() @ read(patch.a).float()
    if patch.transpose:
        delta = delta.T
    merged = w0.float() + delta * patch.scale
    if patch.magnitude is not None:
        rows = merged.T if patch.transpose else merged
        factor = (read(patch.magnitude).float() / torch.linalg.norm(rows, dim=1)).view(-1, 1)
        merged = (factor.T if patch.transpose else factor) * merged
    return merged.to(w0.dtype)
