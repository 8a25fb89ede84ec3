"""Merge coefficients learned through the merged model by entropy minimisation (AdaMerging,
Concrete): the problem (base model, task vectors, unlabelled prompts), the objective, and the
hash-keyed artifact that holds what was learned.

Memory bound: the base model's parameters, the K task vectors of every learned tensor (float32,
stacked), one merged copy, and one forward/backward on a batch per task: about (K + 2) x P
floats plus activations, P the parameters of one model. This is the one place a merge holds
whole models: the gradient of the entropy needs every tensor of the merged model at once, so
the learning does not stream; the merge afterwards does (one tensor at a time)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from amalgam import storage
from amalgam.checkpoint import Checkpoint
from amalgam.errors import StatisticsError
from amalgam.statistics.artifact import StatisticsInfo, read_info, write_artifact
from amalgam.statistics.data import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel

KIND = "learned"
#: ``ctx.stats`` key of the learned table: tensor name -> its K coefficients.
LEARNED_KEY = "learned_coefficients"
COEFFICIENTS = "coefficients"  # artifact tensor: (tensors, K) table, rows in ``names`` order
#: Bumped when what a learner computes changes, so older artifacts are not reused.
VERSION = 1


@dataclass(frozen=True)
class Batch:
    """Right-padded prompts; ``last`` is each row's last prompt position, whose next-token
    distribution is scored."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor


@dataclass
class Problem:
    """What a learner works on. ``names``: the learned tensors (parameters of ``model``, sorted);
    ``base``: their float32 base values; ``deltas``: each one's (K, *shape) task vectors;
    ``tasks``: each model's prompts, encoded (lists of token ids)."""

    model: PreTrainedModel
    names: list[str]
    base: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    tasks: list[list[list[int]]]
    pad_id: int

    @property
    def k(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True)
class Learned:
    """A learner's result: the (tensors, K) coefficients in ``Problem.names`` order, and a mask
    per tensor shared by the K task vectors (None: no mask)."""

    coefficients: torch.Tensor
    masks: dict[str, torch.Tensor] | None = None


def prompt_text(e: Example) -> str:
    """The unlabelled input of an example: its prompt; a ``text`` record is all input."""
    return e.prompt or e.answer


def entropy(model: PreTrainedModel, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """Mean over the batch of the Shannon entropy (nats) of the next-token distribution after
    each prompt, with the model's tensors replaced by ``params`` (torch.func.functional_call),
    differentiable in ``params``."""
    out = torch.func.functional_call(
        model, params, args=(), kwargs={"input_ids": batch.ids, "attention_mask": batch.mask}
    )
    logits = out.logits[torch.arange(len(batch.last)), batch.last].float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class Sampler:
    """Per task, batches of ``size`` prompts drawn without replacement from a reshuffled
    order (seeded), cycling through the task's data."""

    def __init__(self, tasks: list[list[list[int]]], size: int, pad_id: int, seed: int):
        self.tasks, self.size, self.pad_id = tasks, size, pad_id
        self.rng = random.Random(seed)
        self.orders: list[list[int]] = [[] for _ in tasks]

    def batch(self, task: int, device: torch.device) -> Batch:
        picked = []
        while len(picked) < min(self.size, len(self.tasks[task])):
            if not self.orders[task]:
                order = list(range(len(self.tasks[task])))
                self.rng.shuffle(order)
                self.orders[task] = order
            picked.append(self.tasks[task][self.orders[task].pop()])
        return pad(picked, self.pad_id, device)


def pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rows])
    return Batch(ids.to(device), mask.to(device), last.to(device))


def task_loss(problem: Problem, sampler: Sampler, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tasks of the mean entropy on one batch of each task's prompts (the paper's
    objective) through the model with the merged tensors ``params``."""
    device = next(iter(problem.base.values())).device
    losses = [entropy(problem.model, params, sampler.batch(t, device)) for t in range(problem.k)]
    return torch.stack(losses).sum()


def merged(
    problem: Problem,
    coefficients: torch.Tensor,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """theta = base + sum_k c[t, k] (mask ⊙ tau_k) for every learned tensor t (a (1, K) table:
    the same coefficients everywhere)."""
    out = {}
    for t, name in enumerate(problem.names):
        c = coefficients[t if coefficients.shape[0] > 1 else 0]
        delta = torch.tensordot(c, problem.deltas[name], dims=1)
        out[name] = problem.base[name] + (delta if masks is None else masks[name] * delta)
    return out


def build_problem(
    model: PreTrainedModel,
    tokenizer: Any,
    base: Checkpoint,
    models: Sequence[Checkpoint],
    examples: Sequence[Sequence[Example]],
    merged_names: set[str],
    samples: int,
) -> tuple[Problem, dict[str, str]]:
    """The problem over every parameter of ``model`` the plan merges, and the aliases: each
    merged tensor that is a tied copy of a learned one (name -> learned name)."""
    device = next(model.parameters()).device
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(p), name)
        if first != name:
            aliases[name] = first
    names = sorted(n for n in set(canonical.values()) if n in merged_names)
    if not names:
        raise StatisticsError(f"{base.uri}: none of the model's parameters is a merged tensor")
    base_t, deltas = {}, {}
    for n in names:
        w0 = base.tensor(n).float()
        base_t[n] = w0.to(device)
        deltas[n] = torch.stack([m.tensor(n).float() - w0 for m in models]).to(device)
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    tasks = []
    for i, exs in enumerate(examples):
        rows = [
            tokenizer(prompt_text(e), add_special_tokens=False)["input_ids"][-max_len:]
            for e in exs[:samples]
        ]
        rows = [r for r in rows if r]
        if not rows:
            raise StatisticsError(f"models[{i}].data: no example has a prompt to score")
        tasks.append(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return Problem(model, names, base_t, deltas, tasks, pad_id), {
        a: n for a, n in aliases.items() if n in names and a in merged_names
    }


def learned_key(model_hashes: Sequence[str], data_hashes: Sequence[str], settings: dict) -> str:
    body = json.dumps([list(model_hashes), list(data_hashes), settings, VERSION], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def cache_uri(key: str) -> str:
    """``$AMALGAM_HOME/learned/<key>.safetensors``."""
    return str(storage.amalgam_home() / "learned" / f"{key}.safetensors")


def write_learned(
    uri: str,
    learned: Learned,
    names: list[str],
    aliases: dict[str, str],
    *,
    model_hash: str,
    data_hash: str,
    samples: int,
    settings: dict,
) -> StatisticsInfo:
    """The artifact: the coefficient table (rows: ``names``, then the aliases' sorted names),
    and each mask under its tensor's name (aliases included)."""
    rows = [*names, *sorted(aliases)]
    index = {n: i for i, n in enumerate(names)}
    table = learned.coefficients.detach().float().cpu()
    table = table.expand(len(names), -1) if table.shape[0] == 1 else table
    full = torch.stack([table[index[aliases.get(r, r)]] for r in rows])
    tensors = {COEFFICIENTS: full}
    if learned.masks is not None:
        for r in rows:
            tensors[r] = learned.masks[aliases.get(r, r)].detach()
    return write_artifact(
        uri,
        tensors,
        kind=KIND,
        model_hash=model_hash,
        data_hash=data_hash,
        samples=samples,
        tokens=0,
        settings={**settings, "rows": rows},
    )


def read_table(info: StatisticsInfo, ckpt: Checkpoint) -> dict[str, tuple[float, ...]]:
    """Tensor name -> its K coefficients, from an opened learned artifact."""
    rows = info.settings.get("rows")
    table = ckpt.tensor(COEFFICIENTS) if COEFFICIENTS in ckpt.tensors else None
    if not isinstance(rows, list) or table is None or table.shape[0] != len(rows):
        raise StatisticsError(f"{info.uri}: learned coefficients incomplete or corrupt")
    return {r: tuple(float(v) for v in table[i]) for i, r in enumerate(rows)}


def cached_learned(uri: str) -> StatisticsInfo | None:
    """The artifact at ``uri`` if a finished one is there."""
    fs, path = storage.resolve(uri)
    return read_info(uri) if fs.isfile(path) else None
