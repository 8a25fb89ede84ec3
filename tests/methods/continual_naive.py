"""Naive whole-model continual merges, written independently of amalgam's streaming code.

Every model is a dict of float64 tensors held in memory at once; OPCM rotates by the full
(square) singular bases and zeroes entries of the rotated matrix, as its authors' code does,
and rescales by the norm of the whole concatenated task vector.
"""

from __future__ import annotations

import torch

Model = dict[str, torch.Tensor]


def is_linear(name: str) -> bool:
    """The tensors that are linear-layer weights in the test models."""
    return name.endswith("proj.weight") or name == "lm_head.weight"


def rotated_projection(tau: torch.Tensor, merged: torch.Tensor, alpha: float) -> torch.Tensor:
    """U Q V^T with Q = U^T tau V minus its diagonal and its top-left rho x rho block."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    if float(s.sum()) == 0.0:
        return tau.clone()
    total, running, rho = float(s.sum()), 0.0, 0
    for i, value in enumerate(s.tolist()):
        running += value
        if running / total > alpha:
            rho = i
            break
    q = u.T @ tau @ vh.T
    for i in range(min(q.shape)):
        q[i, i] = 0.0
    q[:rho, :rho] = 0.0
    return u @ q @ vh


def whole_norm(model: Model) -> float:
    return float(torch.cat([t.reshape(-1) for t in model.values()]).norm())


def opcm(
    base: Model, models: list[Model], alpha: float, projection: bool = True
) -> tuple[Model, list[float], float]:
    """Merged model, task-vector norms and final lambda after absorbing ``models`` in order
    (without ``projection``: task vectors summed as they are, then rescaled)."""
    taus = [{k: m[k] - base[k] for k in base} for m in models]
    norms = [whole_norm(taus[0])]
    merged = {k: v.clone() for k, v in taus[0].items()}  # the merged task vector
    lam = 1.0
    for tau in taus[1:]:
        norms.append(whole_norm(tau))
        running = {}
        for k in base:
            project = projection and is_linear(k)
            add = rotated_projection(tau[k], merged[k], alpha) if project else tau[k]
            running[k] = lam * merged[k] + add
        lam = whole_norm(running) / (sum(norms) / len(norms))
        merged = {k: v / lam for k, v in running.items()}
    return {k: base[k] + merged[k] for k in base}, norms, lam


def continual_avg(base: Model, models: list[Model]) -> Model:
    return {k: sum(m[k] for m in models) / len(models) for k in base}


def continual_ta(base: Model, models: list[Model], lam: float) -> Model:
    return {k: base[k] + lam * sum(m[k] - base[k] for m in models) for k in base}
