"""Rows for the tokens a model lacks, from the tokens it shares with the donor.

Every function takes float32 tables and returns float32 rows in the model's space:

- :func:`omp_rows`: each new token's donor row as a k-sparse combination of the donor's
  rows of shared tokens (orthogonal matching pursuit), the same coefficients applied to the
  model's rows of those tokens. Local: a token is built from its few nearest relatives.
- :func:`least_squares_rows`: one linear map from donor space to model space fitted on all
  shared tokens, applied to the new tokens' donor rows. Global: one map for every token.
- :func:`subword_rows`: no donor weights; the mean of the model's rows of the pieces its own
  tokenizer cuts the new token's text into.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: New tokens solved together: a (batch x shared tokens) score matrix is held per step.
BATCH = 256


def _driver(matrix: torch.Tensor) -> str | None:
    """SVD-based least squares on CPU (exact on rank-deficient systems); CUDA has one driver."""
    return "gelsd" if matrix.device.type == "cpu" else None


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(atom indices (B, k), coefficients (B, k)) of a k-sparse approximation of each row of
    ``targets`` (B, d) by rows of ``atoms`` (N, d): each step picks the atom most correlated
    (by cosine) with the residual and removes from the residual its component along that atom
    orthogonalised against the atoms picked before (Gram-Schmidt), so the residual is always
    what least squares on the picked atoms leaves; the coefficients are that least-squares
    fit, solved once at the end. Zero atoms (rows never trained, such as a padding row) are
    never picked. ``k`` is at most the number of nonzero atoms."""
    count, width = targets.shape
    norms = atoms.norm(dim=1, keepdim=True)
    unit = atoms / norms.clamp_min(torch.finfo(atoms.dtype).tiny)
    picked = torch.zeros((count, k), dtype=torch.long, device=targets.device)
    taken = (norms.T == 0).expand(count, -1).clone()
    rows = torch.arange(count, device=targets.device)
    basis = targets.new_zeros((count, k, width))  # orthonormal directions of the picked atoms
    residual = targets
    for step in range(k):
        score = (residual @ unit.T).abs().masked_fill(taken, -1.0)
        picked[:, step] = score.argmax(dim=1)
        taken[rows, picked[:, step]] = True
        direction = unit[picked[:, step]]
        for _ in range(2):  # twice: classical Gram-Schmidt loses orthogonality once
            along = torch.einsum("bsd,bd->bs", basis[:, :step], direction)
            direction = direction - torch.einsum("bs,bsd->bd", along, basis[:, :step])
        length = direction.norm(dim=1, keepdim=True)
        # an atom in the span of those picked before adds no direction
        direction = torch.where(length > 1e-6, direction / length, 0.0)
        basis[:, step] = direction
        residual = residual - (residual * direction).sum(dim=1, keepdim=True) * direction
    chosen = atoms[picked].transpose(1, 2)  # (B, d, k)
    coefficients = torch.linalg.lstsq(chosen, targets[:, :, None], driver=_driver(chosen))
    return picked, coefficients.solution[:, :, 0]


def omp_rows(
    donor_new: torch.Tensor, donor_shared: torch.Tensor, model_shared: torch.Tensor, k: int
) -> torch.Tensor:
    """Model-space rows of the new tokens: OMP of ``donor_new`` over ``donor_shared`` (both in
    donor space), coefficients applied to ``model_shared`` (the same tokens in model space)."""
    k = min(k, int((donor_shared.norm(dim=1) > 0).sum()))
    out = model_shared.new_empty((donor_new.shape[0], model_shared.shape[1]))
    for first in range(0, donor_new.shape[0], BATCH):
        chunk = slice(first, first + BATCH)
        picked, coefficients = omp(donor_new[chunk], donor_shared, k)
        out[chunk] = (coefficients[:, None, :] @ model_shared[picked])[:, 0]
    return out


def least_squares_rows(
    donor_new: torch.Tensor, donor_shared: torch.Tensor, model_shared: torch.Tensor
) -> torch.Tensor:
    """Model-space rows of the new tokens through the map M minimising
    ||donor_shared @ M - model_shared|| (minimum norm when the shared tokens underdetermine
    it)."""
    mapping = torch.linalg.lstsq(donor_shared, model_shared, driver=_driver(donor_shared)).solution
    return donor_new @ mapping


def subword_rows(model_table: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per new token, the mean of the model's rows of its ``pieces`` (model ids); a token
    with no piece gets the mean of every model row."""
    fallback = model_table.mean(dim=0)
    rows = [model_table[list(ids)].mean(dim=0) if ids else fallback for ids in pieces]
    return torch.stack(rows) if rows else model_table.new_zeros((0, model_table.shape[1]))
