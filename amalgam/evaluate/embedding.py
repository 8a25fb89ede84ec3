"""The scorer of encoder (sentence-embedding) models on embedding task folders, and the choice
between it and lm-eval for a model and a task list.

A model is loaded with transformers' ``AutoModel`` (no language-model head) and pooled as its
sentence-transformers files say (``modules.json`` -> the Pooling module's ``config.json``:
cls, max, mean or mean-sqrt-len tokens, concatenated in that order when several are set;
normalized when a Normalize module is listed); a folder without ``modules.json`` gets mean
pooling, and a warning says so. Task folders: :mod:`amalgam.evaluate.embedding_tasks`; the
math: :mod:`amalgam.evaluate.embedding_metrics`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amalgam.device import compute_threads, pick_device
from amalgam.evaluate import embedding_metrics as em
from amalgam.evaluate.embedding_tasks import (
    FIELDS,
    KINDS,
    is_embedding_task,
    read_records,
    read_task,
    relevance,
)
from amalgam.evaluate.results import TaskResult
from amalgam.evaluate.taskdir import EvaluationError

log = logging.getLogger(__name__)

POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")
#: Architecture name endings of models with a generative language-model head.
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
LM_EVAL_SCORERS = "lm-eval tasks (multiple_choice, loglikelihood, generate_until, perplexity)"
EMBEDDING_SCORERS = f"embedding tasks ({', '.join(KINDS)}; a task folder with embedding.json)"


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False


def architecture(folder: Path) -> tuple[str, bool]:
    """(the model's architecture name, whether it is an encoder without a generative head),
    from its ``config.json``; a folder without one (a PEFT adapter) counts as a causal LM."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return "an adapter or unknown model", False
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    name = archs[0] if archs else f"model_type {config.get('model_type')!r}"
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) or config.get("is_decoder"):
        return name, False
    # any other architecture (BertModel, XLMRobertaForMaskedLM, ...ForSequenceClassification)
    # has an encoder body that AutoModel loads without a head
    return name, bool(archs) or (Path(folder) / "modules.json").is_file()


def uses_embedding_scorer(folder: Path, tasks_dir: Path | None, tasks: list[str]) -> bool:
    """Whether ``tasks`` on the model in ``folder`` are scored here (True) or by lm-eval;
    a model that does not fit its tasks is an :class:`EvaluationError` naming both."""
    name, encoder = architecture(folder)
    embedding = [t for t in tasks if tasks_dir and is_embedding_task(tasks_dir, t)]
    other = [t for t in tasks if t not in embedding]
    if encoder and other:
        raise EvaluationError(
            f"{folder}: {name} is an encoder with no language-model head, so it cannot run "
            f"the lm-eval task(s) {', '.join(other)}; score it with {EMBEDDING_SCORERS}"
        )
    if not encoder and embedding:
        raise EvaluationError(
            f"{folder}: {name} is not a sentence encoder, so it cannot run the embedding "
            f"task(s) {', '.join(embedding)}; score it with {LM_EVAL_SCORERS}"
        )
    return encoder


def read_pooling(folder: Path) -> Pooling:
    """The pooling of a sentence-transformers folder; mean pooling (with a warning) without."""
    modules_path = Path(folder) / "modules.json"
    if not modules_path.is_file():
        log.warning("%s: no sentence-transformers modules.json; using mean pooling", folder)
        return Pooling()
    modules = json.loads(modules_path.read_text())
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    normalize = "Normalize" in kinds
    if "Pooling" not in kinds:
        log.warning("%s: modules.json lists no Pooling module; using mean pooling", folder)
        return Pooling(normalize=normalize)
    path = Path(folder) / kinds["Pooling"].get("path", "") / "config.json"
    if not path.is_file():
        raise EvaluationError(f"{path}: the Pooling module's config is missing")
    config = json.loads(path.read_text())
    if isinstance(config.get("pooling_mode"), str):  # newer files name one mode
        config[f"pooling_mode_{config['pooling_mode']}"] = True
    unsupported = [
        k.removeprefix("pooling_mode_")
        for k, v in config.items()
        if k.startswith("pooling_mode_")
        and v is True
        and k.removeprefix("pooling_mode_") not in POOLING_MODES
    ]
    if unsupported:
        raise EvaluationError(
            f"{path}: pooling {', '.join(unsupported)} is not supported "
            f"(use {', '.join(POOLING_MODES)})"
        )
    modes = tuple(m for m in POOLING_MODES if config.get(f"pooling_mode_{m}"))
    if not modes:
        raise EvaluationError(f"{path}: no pooling mode is set")
    return Pooling(modes=modes, normalize=normalize)


def pool(hidden: Any, mask: Any, pooling: Pooling) -> Any:
    """Sentence vectors (torch) from token states ``hidden`` (batch, tokens, dim) and the
    attention ``mask`` (batch, tokens)."""
    # lazy: torch takes a second to import
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    lengths = m.sum(dim=1).clamp(min=1e-9)
    parts = {
        "cls_token": lambda: hidden[:, 0],
        "max_tokens": lambda: hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values,
        "mean_tokens": lambda: (hidden * m).sum(dim=1) / lengths,
        "mean_sqrt_len_tokens": lambda: (hidden * m).sum(dim=1) / lengths.sqrt(),
    }
    out = torch.cat([parts[mode]() for mode in pooling.modes], dim=-1)
    return torch.nn.functional.normalize(out, dim=-1) if pooling.normalize else out


class Encoder:
    """A sentence encoder from a local folder: ``encode(texts)`` gives float32 numpy rows
    (torch on all cores but one: on a busy CPU, that one spare core is many times faster)."""

    def __init__(self, folder: Path, device: str = "auto", batch_size: int = 32):
        # lazy: torch and transformers take seconds to import
        import torch
        from transformers import AutoModel, AutoTokenizer  # lazy: as above

        self.folder, self.batch_size = Path(folder), batch_size
        self.pooling = read_pooling(self.folder)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder, dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        self.max_length = _max_length(self.folder, self.tokenizer)

    def encode(self, texts: list[str]) -> np.ndarray:
        # lazy: as in __init__
        import torch

        rows = []
        with compute_threads(None), torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[i : i + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                rows.append(pool(hidden, batch["attention_mask"], self.pooling).float().cpu())
        return torch.cat(rows).numpy()


def _max_length(folder: Path, tokenizer: Any) -> int:
    """sentence-transformers' ``max_seq_length`` when given, else the tokenizer's (capped)."""
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return min(int(tokenizer.model_max_length or 512), 512)


def score_task(
    encoder: Encoder, tasks_dir: Path, task: str, split: str, limit: int | None
) -> TaskResult:
    """One embedding task's :class:`TaskResult` on ``split`` (at most ``limit`` records)."""
    kind = read_task(tasks_dir, task)
    records = read_records(tasks_dir, task, split, FIELDS[kind.type])[:limit]
    where = str(Path(tasks_dir) / task / f"{split}.jsonl")
    if kind.type == "classification":
        train = read_records(tasks_dir, task, "train", FIELDS["classification"])
        predicted = em.nearest_centroid(
            encoder.encode([r["text"] for r in train]),
            [str(r["label"]) for r in train],
            encoder.encode([r["text"] for r in records]),
        )
        correct = [p == str(r["label"]) for p, r in zip(predicted, records, strict=True)]
        return TaskResult(accuracy=sum(correct) / len(correct), correct=correct, metric="acc")
    if kind.type == "sts":
        a = encoder.encode([r["text1"] for r in records])
        b = encoder.encode([r["text2"] for r in records])
        sims = (em.normalize(a) * em.normalize(b)).sum(axis=1)
        rho = em.spearman(sims.tolist(), [float(r["score"]) for r in records])
        if not math.isfinite(rho):
            raise EvaluationError(f"{where}: Spearman is undefined (constant scores)")
        return TaskResult(accuracy=rho, correct=[], metric="spearman")
    figures = retrieval_figures(encoder, tasks_dir, task, records, kind.k, kind.recall_at, where)
    return TaskResult(accuracy=figures[f"ndcg@{kind.k}"], correct=[], metric=f"ndcg@{kind.k}")


def retrieval_figures(
    encoder: Encoder,
    tasks_dir: Path,
    task: str,
    records: list[dict[str, Any]],
    k: int,
    recall_at: list[int],
    where: str,
) -> dict[str, float]:
    """Mean nDCG@k and recall@each cut-off of ``records`` (queries) over the task's corpus."""
    corpus = read_records(tasks_dir, task, "corpus", ("id", "text"))
    index = {str(d["id"]): i for i, d in enumerate(corpus)}
    grades = []
    for n, r in enumerate(records, 1):
        rel = relevance(r, f"{where}:{n}")
        unknown = sorted(set(rel) - set(index))
        if unknown:
            raise EvaluationError(f"{where}:{n}: unknown document id(s) {', '.join(unknown)}")
        grades.append({index[d]: g for d, g in rel.items()})
    ranked = em.ranking(
        em.cosine(
            encoder.encode([r["query"] for r in records]),
            encoder.encode([d["text"] for d in corpus]),
        )
    )
    pairs = list(zip(ranked, grades, strict=True))
    out = {f"ndcg@{k}": float(np.mean([em.ndcg_at_k(r, g, k) for r, g in pairs]))}
    for cut in recall_at:
        out[f"recall@{cut}"] = float(np.mean([em.recall_at_k(r, g, cut) for r, g in pairs]))
    return out


def score_embedding_tasks(
    folder: Path,
    tasks_dir: Path,
    tasks: list[str],
    *,
    split: str = "test",
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 32,
) -> dict[str, TaskResult]:
    """Task -> result of the encoder in ``folder`` on the embedding ``tasks`` of ``tasks_dir``
    (``split`` records, at most ``limit`` of each)."""
    encoder = Encoder(folder, device, batch_size)
    return {t: score_task(encoder, Path(tasks_dir), t, split, limit) for t in tasks}
