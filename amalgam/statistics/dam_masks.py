"""Learns DAM's masks (``amalgam.methods.dam``) from every model's unlabelled prompts, and
caches them as one mask artifact per model under $AMALGAM_HOME/statistics."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from amalgam.device import compute_threads, load_causal_lm
from amalgam.errors import StatisticsError
from amalgam.methods.params import resolve_params
from amalgam.statistics.artifact import StatisticsInfo, read_info, write_artifact
from amalgam.statistics.compute import cache_path
from amalgam.statistics.data import load_examples

if TYPE_CHECKING:
    from amalgam.checkpoint import Checkpoint

KIND = "dam_mask"
VERSION = 5
SEARCH_CHUNK = 4096  # sequences per forward pass of the trigger search
SEARCH_PROMPTS = 32  # the first prompts of each model's data the trigger search scores


@dataclass(frozen=True)
class Settings:
    """The recipe-wide values the learning reads."""

    lam: float
    weights: tuple[float, ...]
    steps: int
    lr: float
    temperature: float
    adv_weight: float
    perf_weight: float
    triggers: int
    min_gain: float
    drop: float
    search_every: int
    batch_size: int
    seed: int


def concrete_sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """A relaxed-Bernoulli mask: sigmoid((log u - log(1 - u) + logits) / temperature),
    u ~ U(0, 1) drawn from ``generator`` (on the CPU, then moved to the logits' device)."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-6, 1 - 1e-6).to(logits.device)
    return torch.sigmoid((u.log() - (-u).log1p() + logits) / temperature)


def mean_one(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` divided by its mean (the paper's rescaling, keeping the expected scale)."""
    return mask / mask.mean().clamp_min(1e-12)


def final_masks(
    shared: torch.Tensor, detection: list[torch.Tensor], drop: float
) -> list[torch.Tensor]:
    """Model i's merge mask from the learned logits: 1 where neither the shared logit nor
    model i's detection logit fell below -``drop``, else 0."""
    keep = shared.float() >= -drop
    return [(keep & (d.float() >= -drop)).float() for d in detection]


def learn_masks(
    recipe: Any, inputs: dict[str, Checkpoint], device: str
) -> tuple[StatisticsInfo, ...]:
    """One mask artifact per recipe model, learned on the union of the models' ``data``
    prompts (the first ``samples`` of each), or read from the cache."""
    params = resolve_params(recipe, recipe.method_spec, None, 1)
    shared = params.shared
    settings = Settings(
        lam=float(shared["lambda"]),
        weights=tuple(float(w) for w in params.each("weight")),
        steps=int(shared["steps"]),
        lr=float(shared["lr"]),
        temperature=float(shared["temperature"]),
        adv_weight=float(shared["adv_weight"]),
        perf_weight=float(shared["perf_weight"]),
        triggers=int(shared["triggers"]),
        min_gain=float(shared["min_gain"]),
        drop=float(shared["drop"]),
        search_every=int(shared["search_every"]),
        batch_size=int(shared["batch_size"]),
        seed=int(recipe.seed),
    )
    texts, hashes = [], []
    for i, m in enumerate(recipe.models):
        if not m.data:
            raise StatisticsError(f"models[{i}].data: method 'dam' needs unlabelled prompts")
        examples, data_hash = load_examples(m.data, **recipe.storage_options)
        texts.append([e.prompt or e.answer for e in examples[: int(shared["samples"])]])
        hashes.append(data_hash)
    data_hash = "sha256:" + hashlib.sha256("\0".join(hashes).encode()).hexdigest()
    model_hashes = [inputs[m.label].content_hash() for m in recipe.models]
    key = {
        "version": VERSION,
        "base": inputs["base"].content_hash(),
        "models": model_hashes,
        "samples": int(shared["samples"]),
        **{k: v for k, v in vars(settings).items()},
    }
    key["weights"] = list(settings.weights)
    paths = [
        cache_path(h, data_hash, KIND, {**key, "index": i}) for i, h in enumerate(model_hashes)
    ]
    if all(p.is_file() for p in paths):
        return tuple(read_info(str(p)) for p in paths)
    with compute_threads(None):
        model, tokenizer = load_causal_lm(recipe.base, device)
        names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        target = next(model.parameters()).device
        base = {n: inputs["base"].tensor(n).float().to(target) for n in names}
        deltas = [
            {n: inputs[m.label].tensor(n).float().to(target) - base[n] for n in names}
            for m in recipe.models
        ]
        groups = [[tokenizer(t, add_special_tokens=False)["input_ids"] for t in g] for g in texts]
        special = set(tokenizer.all_special_ids)
        candidates = [v for v in range(len(tokenizer)) if v not in special]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        masks, found = learn(model, base, deltas, groups, candidates, pad, settings)
    infos = []
    for i, (path, h) in enumerate(zip(paths, model_hashes, strict=True)):
        infos.append(
            write_artifact(
                str(path),
                masks[i],
                kind=KIND,
                model_hash=h,
                data_hash=data_hash,
                samples=sum(len(g) for g in groups),
                tokens=sum(len(p) for g in groups for p in g),
                settings={**key, "index": i, "inverted_triggers": found},
            )
        )
    return tuple(infos)


def learn(
    model: torch.nn.Module,
    base: dict[str, torch.Tensor],
    deltas: list[dict[str, torch.Tensor]],
    groups: Sequence[Sequence[Sequence[int]]],
    candidates: Sequence[int],
    pad: int,
    s: Settings,
) -> tuple[list[dict[str, torch.Tensor]], list[list[int]]]:
    """The alternating mask learning of ``amalgam.methods.dam`` on prompt ``groups`` (one per
    model's data); returns each model's final mask per tensor and each group's trigger tokens
    kept by the last search."""
    if not groups or any(not g or any(not p for p in g) for g in groups):
        raise StatisticsError("dam: every model's data needs prompts of at least one token")
    generator = torch.Generator().manual_seed(s.seed)
    device = next(iter(base.values())).device
    logits_s = {n: torch.zeros_like(t, requires_grad=True) for n, t in base.items()}
    logits_b = [
        {n: torch.zeros_like(t, requires_grad=True) for n, t in base.items()} for _ in deltas
    ]
    opt_s = torch.optim.Adam(list(logits_s.values()), lr=s.lr)
    opt_b = torch.optim.Adam([t for d in logits_b for t in d.values()], lr=s.lr)
    per_group = max(1, s.batch_size // len(groups))
    searched = [list(g[:SEARCH_PROMPTS]) for g in groups]
    triggers: list[list[int]] = []

    def merged(sample_s: bool, sample_b: bool) -> dict[str, torch.Tensor]:
        out = {}
        for n, w0 in base.items():
            ms = _mask(logits_s[n], sample_s, s.temperature, generator)
            total = torch.zeros_like(w0)
            for d, lb, w in zip(deltas, logits_b, s.weights, strict=True):
                mb = _mask(lb[n], sample_b, s.temperature, generator)
                total = total + w * mean_one(ms * mb) * d[n]
            out[n] = w0 + s.lam * total
        return out

    model.eval()
    for step in range(s.steps):
        batches = [
            [list(g[int(i)]) for i in torch.randint(len(g), (per_group,), generator=generator)]
            for g in groups
        ]
        batch = [p for b in batches for p in b]
        if step % s.search_every == 0:
            with torch.no_grad():
                current = {n: t.detach() for n, t in merged(False, False).items()}
                found = [
                    search_triggers(model, current, g, candidates, pad, s.triggers)
                    for g in searched
                ]
            # a token counts as a trigger only where it pulls min_gain of the prompts onto one
            # answer; a group without one adds no safety loss
            triggers = [[t for t, share in f if share >= s.min_gain] for f in found]
        if s.perf_weight:  # task-shared mask: entropy of the merge on clean prompts
            loss = entropy(next_token_logits(model, merged(True, False), batch, pad, device))
            opt_s.zero_grad(set_to_none=True)
            (s.perf_weight * loss).backward()
            opt_s.step()
        # backdoor-detection masks: entropy plus disagreement under each group's triggers
        params = merged(False, True)
        clean = next_token_logits(model, params, batch, pad, device)
        answers = clean.detach().argmax(-1)
        attacked, wanted = [], []
        for k, (b, ts) in enumerate(zip(batches, triggers, strict=True)):
            for t in ts:
                attacked += [[t, *p] for p in b]
                wanted.append(answers[k * per_group : (k + 1) * per_group])
        safety = (
            torch.nn.functional.cross_entropy(
                next_token_logits(model, params, attacked, pad, device), torch.cat(wanted)
            )
            if attacked
            else clean.new_zeros(())
        )
        loss = s.perf_weight * entropy(clean) + s.adv_weight * safety
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()
    masks = [
        {n: final_masks(logits_s[n].detach(), [lb[n].detach()], s.drop)[0] for n in base}
        for lb in logits_b
    ]
    return masks, triggers


def _mask(
    logits: torch.Tensor, sample: bool, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """A Concrete sample (trained), or the detached keep probability (held fixed)."""
    if sample:
        return concrete_sample(logits, temperature, generator)
    return torch.sigmoid(logits.detach())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1).mean()


def next_token_logits(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    batch: Sequence[Sequence[int]],
    pad: int,
    device: torch.device,
) -> torch.Tensor:
    """Logits of the token after each prompt, the model run with ``params``
    (``torch.func.functional_call``), prompts right-padded."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, : len(p)] = torch.tensor(p)
        mask[row, : len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = torch.func.functional_call(model, params, (ids,), {"attention_mask": mask})
    last = mask.sum(1) - 1
    return out.logits[torch.arange(len(batch), device=device), last]


def search_triggers(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    batch: Sequence[Sequence[int]],
    candidates: Sequence[int],
    pad: int,
    keep: int,
) -> list[tuple[int, float]]:
    """The ``keep`` candidate tokens (with their gain, a share of the batch) that, put in
    front of every prompt of ``batch``, pull the merge's top next-token predictions onto one
    answer most: the largest gain, over answers a, of the count of prompts predicting a (with
    the token minus without it). A backdoor trigger sends every prompt to its target; a token
    that only shifts answers (one more letter to count) gains little. Ties: lower token id."""
    device = next(iter(params.values())).device
    logits = next_token_logits(model, params, batch, pad, device)
    clean, size = logits.argmax(-1), logits.shape[-1]
    scores = []
    per = max(1, SEARCH_CHUNK // len(batch))
    for first in range(0, len(candidates), per):
        chunk = candidates[first : first + per]
        seqs = [[t, *p] for t in chunk for p in batch]
        top = next_token_logits(model, params, seqs, pad, device).argmax(-1)
        for row in top.view(len(chunk), len(batch)):
            gain = torch.bincount(row, minlength=size) - torch.bincount(clean, minlength=size)
            scores.append(int(gain.max()))
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], candidates[i]))
    return [(candidates[i], scores[i] / len(batch)) for i in order[:keep]]
