"""MC-SMoE's merge step ("Merge, Then Compress", arXiv 2310.01334): fewer experts per MoE layer.

Per layer, from the routing statistics of :mod:`amalgam.compress.routing`:

1. the ``k`` most used experts are the dominant ones (ties: the lower index);
2. every other expert joins the dominant expert with the highest router-logit similarity
   ((cos + 1) / 2 of their logit columns), one-shot as the paper;
3. each member is aligned to its dominant expert by one permutation of its intermediate units
   (weight matching: maximise ⟨W1_d, W1_e P⟩ + ⟨W3_d, W3_e P⟩ + ⟨W2_d, P W2_e⟩ by
   ``linear_sum_assignment``), then the group is averaged with the members' usage frequencies
   as weights.

Router folding: the paper keeps every router row and ties the group's experts to the merged
one. A physically smaller model cannot keep rows that point to no expert, so each group gets
one row: its dominant expert's (``dominant``: row g of the output router is row
``dominant(g)`` of the input one, the others dropped), or its members' rows averaged with the
merge's weights (``average``: row g = Σ_e w_e row_e, a linear stand-in for the tied router's
"any member chosen"). Top-k weights are renormalised over the chosen experts (Mixtral, and
Qwen2-MoE with ``norm_topk_prob``), so folding changes which experts a token picks, not how
the picked ones are weighted against each other.

The paper's second step (low-rank + sparse experts) is :mod:`amalgam.compress.losparse`, one
shot, without the paper's distillation finetune. The baselines of the paper's tables are
settings of the same code: ``expert_merge: drop`` keeps the dominant experts alone,
``uniform`` with ``align: false`` averages each group plainly.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

Expert = dict[str, torch.Tensor]  # projection (gate/up/down) -> weight, float32


def dominant_groups(freq: torch.Tensor, sim: torch.Tensor, k: int) -> list[list[int]]:
    """``k`` groups in the order of their dominant expert's index, each ``[dominant,
    members...]`` (members ascending)."""
    order = sorted(range(len(freq)), key=lambda e: (-float(freq[e]), e))
    dominants = sorted(order[:k])
    groups = {d: [d] for d in dominants}
    for e in range(len(freq)):
        if e not in groups:
            best = max(dominants, key=lambda d: (float(sim[e, d]), -d))
            groups[best].append(e)
    return [groups[d] for d in dominants]


def permutation_to(ref: Expert, other: Expert) -> torch.Tensor:
    """The order of ``other``'s intermediate units that best matches ``ref``'s: unit i of the
    aligned expert is unit ``perm[i]`` of ``other``."""
    cost = ref["gate"] @ other["gate"].T + ref["up"] @ other["up"].T + ref["down"].T @ other["down"]
    rows, cols = linear_sum_assignment(cost.double().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permuted(expert: Expert, perm: torch.Tensor) -> Expert:
    """``expert`` with its intermediate units reordered (the function it computes is equal)."""
    return {"gate": expert["gate"][perm], "up": expert["up"][perm], "down": expert["down"][:, perm]}


def group_weights(group: list[int], freq: torch.Tensor, merge: str) -> list[float]:
    """The merge weight of each member of ``group``: its usage frequency (``frequency``), 1
    (``uniform``), or the dominant's alone (``drop``); normalised to sum to 1."""
    if merge == "drop":
        raw = [1.0] + [0.0] * (len(group) - 1)
    elif merge == "uniform":
        raw = [1.0] * len(group)
    else:
        raw = [float(freq[e]) for e in group]
        if sum(raw) <= 0:  # a group nothing routes to: plain average
            raw = [1.0] * len(group)
    total = sum(raw)
    return [w / total for w in raw]


def merge_group(
    members: list[Expert], weights: list[float], align: bool
) -> tuple[Expert, list[int]]:
    """(the weighted average of ``members`` (the first is the dominant), each aligned to the
    dominant first when ``align``; per member, how many of its units the alignment moved).
    Members of weight 0 are skipped (0 units moved)."""
    ref = members[0]
    out = {p: torch.zeros_like(w) for p, w in ref.items()}
    moved = [0] * len(members)
    for i, (expert, weight) in enumerate(zip(members, weights, strict=True)):
        if weight == 0:
            continue
        if align and i > 0:
            perm = permutation_to(ref, expert)
            moved[i] = int((perm != torch.arange(len(perm))).sum())
            expert = permuted(expert, perm)
        for p in out:
            out[p] += weight * expert[p]
    return out, moved


def fold_router(
    gate: torch.Tensor, groups: list[list[int]], weights: list[list[float]], fold: str
) -> torch.Tensor:
    """The (groups, hidden) router of the merged layer from the (experts, hidden) one: each
    group's dominant row (``dominant``) or its members' rows weighted by ``weights``
    (``average``)."""
    if fold == "dominant":
        return gate[[g[0] for g in groups]]
    rows = [
        sum(w * gate[e].float() for e, w in zip(g, ws, strict=True))
        for g, ws in zip(groups, weights, strict=True)
    ]
    return torch.stack(rows).to(gate.dtype)
