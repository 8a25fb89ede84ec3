"""PLeaS (arXiv 2407.02447): partial matching of MLP units, then layer-wise least squares.

Two models A and B of one architecture (decoder, Llama-style names) are merged in two steps:

1. **Partial matching.** Per layer, B's MLP units are matched to A's by the correlation of
   their activations (the input of ``down_proj``) on the data, by linear assignment. The
   ``budget`` fraction of pairs that correlate least is not merged: both units are kept side
   by side, so every MLP grows from ``I`` to ``I + round(budget * I)`` units (the width rule;
   0 keeps the size). Each model is rewritten in that wider layout ("widened"): its units in
   their slots, zeros in the other model's unmerged slots, so it computes what it computed.
2. **Least squares.** Layer by layer in forward order, every linear layer of the merged model
   (first the widened models' mean) is refit in closed form so that, on the data, its output
   from the *merged* model's own input approximates each model's output of that layer from
   that model's input: ``min_W sum_i ||W X_M - Y_i||^2 + lambda ||W||^2``, with the sum over
   the models owning each output unit (an unmerged unit has one owner). The sum of squares
   over models is the squared error to the owners' mean target plus a constant, so the
   solution is one ridge regression per layer onto the mean target; ``lambda`` is ``ridge``
   times the mean diagonal of ``X_M^T X_M``. Embeddings and norms keep the widened mean.

Attention heads and the residual stream are not permuted here (the layer fits absorb what
they can); run a permutation aligner first to align them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]
MLP_ROWS = ("mlp.gate_proj", "mlp.up_proj")  # their output rows are the MLP units
MLP_COLUMNS = "mlp.down_proj"  # its input columns are the MLP units


class _Stop(Exception):
    """Raised by a forward hook once the layer it watches has run."""


@dataclass(frozen=True)
class Matching:
    """Per layer: B's unit for each of A's (``perm[j]`` matches A's unit ``j``), the pairs
    left unmerged (A's slots, ascending), and each pair's activation correlation."""

    perm: list[torch.Tensor]
    unmerged: list[torch.Tensor]
    correlation: list[torch.Tensor]

    @property
    def extra(self) -> int:
        return len(self.unmerged[0]) if self.unmerged else 0


def ridge_fit(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W`` (out x in) minimising ``||X W^T - Y||^2 + lambda ||W||^2`` from ``gram = X^T X``
    and ``cross = X^T Y``; ``lambda = ridge * mean(diag(gram))`` (scale-free), in float64."""
    gram, cross = gram.double(), cross.double()
    lam = ridge * float(gram.diagonal().mean()) if gram.numel() else 0.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, cross).T


def pleas_layer(
    x_merged: torch.Tensor,
    targets: Sequence[torch.Tensor],
    ridge: float,
    owners: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One layer's PLeaS weight from features in memory: ``x_merged`` (tokens x in), each
    model's output ``targets[i]`` (tokens x out), ``owners[i]`` (out,) which units model ``i``
    owns (all by default)."""
    gram, cross = least_squares_terms(x_merged, targets, owners)
    return ridge_fit(gram, cross, ridge)


def least_squares_terms(
    x: torch.Tensor, targets: Sequence[torch.Tensor], owners: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``X^T X``, ``X^T T``) of one batch, ``T`` the owners' mean of the targets, per unit."""
    x = x.double()
    if owners is None:
        mean = torch.stack([t.double() for t in targets]).mean(0)
    else:
        weight = torch.stack([o.double() for o in owners])  # models x out
        total = sum(t.double() * w for t, w in zip(targets, weight, strict=True))
        mean = total / weight.sum(0).clamp(min=1.0)
    return x.T @ x, x.T @ mean


def token_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 32,
) -> list[Batch]:
    """The texts tokenized (the first ``max_length`` tokens) and padded into batches
    (``input_ids``, ``attention_mask``)."""
    batches = []
    for first in range(0, len(texts), batch_size):
        chunk = [
            tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
            for t in texts[first : first + batch_size]
        ]
        width = max(len(ids) for ids in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def layer_io(model: PreTrainedModel, name: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of module ``name`` on the batch's real tokens (tokens x features); the
    forward pass stops there."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        seen["x"], seen["y"] = args[0], output
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    keep = batch["attention_mask"].bool()
    return seen["x"][keep].float(), seen["y"][keep].float()


def linear_layers(model: PreTrainedModel) -> list[str]:
    """Names of the model's linear layers in forward order (registration order in HF)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def match_units(
    a: PreTrainedModel, b: PreTrainedModel, batches: list[Batch], budget: float
) -> Matching:
    """PLeaS's partial matching of the MLP units of ``b`` to those of ``a`` (see module doc)."""
    from scipy.optimize import linear_sum_assignment  # lazy: scipy, only when matching

    perms, unmerged, correlations = [], [], []
    for layer in range(a.config.num_hidden_layers):
        name = f"model.layers.{layer}.{MLP_COLUMNS}"
        acts_a = torch.cat([layer_io(a, name, batch)[0] for batch in batches]).double()
        acts_b = torch.cat([layer_io(b, name, batch)[0] for batch in batches]).double()
        corr = _standardize(acts_a).T @ _standardize(acts_b) / acts_a.shape[0]
        _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        perm = torch.as_tensor(cols)
        paired = corr[torch.arange(len(perm)), perm]
        extra = round(budget * len(perm))
        perms.append(perm)
        unmerged.append(torch.sort(torch.argsort(paired)[:extra]).values)
        correlations.append(paired.float())
    return Matching(perms, unmerged, correlations)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0).clamp(min=1e-8)


def widen(
    state: dict[str, torch.Tensor], matching: Matching, *, second: bool
) -> dict[str, torch.Tensor]:
    """One model's tensors in the merged layout: its MLP units (B's permuted onto A's when
    ``second``) in ``I + extra`` slots; zeros where the other model's unmerged units sit."""
    out = dict(state)
    for layer, (perm, unmerged) in enumerate(zip(matching.perm, matching.unmerged, strict=True)):
        prefix = f"model.layers.{layer}."
        for part in (*MLP_ROWS, MLP_COLUMNS):
            name = f"{prefix}{part}.weight"
            w = state[name] if part != MLP_COLUMNS else state[name].T
            w = w[perm] if second else w
            slots = torch.zeros((w.shape[0] + len(unmerged), *w.shape[1:]), dtype=w.dtype)
            slots[: w.shape[0]] = w
            if second:
                slots[w.shape[0] :] = w[unmerged]
                slots[unmerged] = 0
            out[name] = slots if part != MLP_COLUMNS else slots.T.contiguous()
    return out


def owners(name: str, matching: Matching, size: int) -> list[torch.Tensor] | None:
    """Which output units each model owns in layer ``name`` (None: both own all)."""
    if not name.endswith(MLP_ROWS):
        return None
    layer = int(name.split(".")[2])
    first = torch.ones(size, dtype=torch.bool)
    second = torch.ones(size, dtype=torch.bool)
    width = size - matching.extra
    first[width:] = False
    second[matching.unmerged[layer]] = False
    return [first, second]


def wider_model(model: PreTrainedModel, state: dict[str, torch.Tensor], extra: int):
    """A copy of ``model`` with ``extra`` more MLP units, holding ``state``."""
    config = copy.deepcopy(model.config)
    config.intermediate_size = model.config.intermediate_size + extra
    wide = type(model)(config).eval()
    wide.load_state_dict(state)
    return wide


def fit_merged(
    merged: PreTrainedModel,
    models: Sequence[PreTrainedModel],
    batches: list[Batch],
    *,
    ridge: float,
    matching: Matching,
) -> None:
    """Refit every linear layer of ``merged`` in place, in forward order (see module doc)."""
    for name in linear_layers(merged):
        layer = merged.get_submodule(name)
        gram = torch.zeros((layer.in_features, layer.in_features), dtype=torch.float64)
        cross = torch.zeros((layer.in_features, layer.out_features), dtype=torch.float64)
        own = owners(name, matching, layer.out_features)
        for batch in batches:
            x, _ = layer_io(merged, name, batch)
            targets = [layer_io(m, name, batch)[1] for m in models]
            if layer.bias is not None:
                x = torch.cat([x, torch.ones((x.shape[0], 1))], 1)
            g, c = least_squares_terms(x, targets, own)
            gram += g
            cross += c
        solved = ridge_fit(gram, cross, ridge).float()
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.copy_(solved[:, -1])
                solved = solved[:, :-1]
            layer.weight.copy_(solved)


def pleas_merge(
    a: PreTrainedModel,
    b: PreTrainedModel,
    batches: list[Batch],
    *,
    budget: float = 0.0,
    ridge: float = 1e-4,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], Matching]:
    """(PLeaS merged tensors, A and B widened into its layout, the matching) of two models."""
    matching = match_units(a, b, batches, budget)
    widened = [
        widen({k: v.float() for k, v in m.state_dict().items()}, matching, second=i == 1)
        for i, m in enumerate((a, b))
    ]
    wide = [wider_model(a, state, matching.extra) for state in widened]
    mean = {k: (widened[0][k] + widened[1][k]) / 2 for k in widened[0]}
    merged = wider_model(a, mean, matching.extra)
    fit_merged(merged, wide, batches, ridge=ridge, matching=matching)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, widened, matching
