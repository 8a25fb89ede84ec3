"""Fine-tuning of a sentence encoder on one MiniLM-zoo task (contrastive, whole model)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from amalgam.evaluate.embedding import pool, read_pooling
from amalgam.zoo.minilm import data

#: Cosine similarities are multiplied by this before the softmax (sentence-transformers' 20).
SCALE = 20.0
#: sentence-transformers files copied from the base: the fine-tune pools as the base does.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def fine_tune(
    base: Path,
    out: Path,
    task: str,
    examples: list[Any],
    settings: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Train a copy of the encoder in ``base`` on ``task`` and save it into ``out``
    (safetensors, tokenizer and the base's sentence-transformers files)."""
    torch.manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base, dtype=torch.float32).train()
    pooling = read_pooling(base)
    labels = sorted({e["label"] for e in examples}) if task == "sentiment" else []
    prototypes = torch.nn.Parameter(torch.randn(len(labels), model.config.hidden_size) * 0.02)
    params = [*model.parameters(), prototypes]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return F.normalize(pool(model(**batch).last_hidden_state, batch["attention_mask"], pooling))

    for step in range(settings["steps"]):
        batch = rng.sample(examples, settings["batch_size"])
        if task == "sentiment":
            logits = SCALE * embed([e["text"] for e in batch]) @ F.normalize(prototypes).T
            target = torch.tensor([labels.index(e["label"]) for e in batch])
        else:
            queries = embed([data.passive(a, v, p) for a, v, p in batch])
            docs = embed(
                [f"{a} {v} {p}." for a, v, p in batch] + [f"{p} {v} {a}." for a, v, p in batch]
            )
            logits = SCALE * queries @ docs.T
            target = torch.arange(len(batch))
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == settings["steps"] - 1:
            log(f"minilm zoo: {task} step {step} loss {loss.item():.4f}")
    save_encoder(model.eval(), tokenizer, base, out)


def save_encoder(model: Any, tokenizer: Any, source: Path, out: Path) -> None:
    """``model`` (safetensors) and ``tokenizer`` into ``out``, with the sentence-transformers
    files of ``source``, so that ``out`` pools as ``source`` does."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    shutil.copytree(source / "1_Pooling", out / "1_Pooling")


def copy_base(source: Path, out: Path) -> None:
    """The pretrained encoder in ``source`` saved again into ``out`` (the same weights, in the
    tensor names and layout the fine-tunes are saved in, so that merges line up)."""
    save_encoder(
        AutoModel.from_pretrained(source, dtype=torch.float32),
        AutoTokenizer.from_pretrained(source),
        source,
        out,
    )
