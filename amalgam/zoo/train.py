"""Deterministic CPU training of the zoo's small causal language models."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

if TYPE_CHECKING:
    from peft import PeftModel

from amalgam.zoo.profiles import ModelShape, Schedule
from amalgam.zoo.tasks import Example
from amalgam.zoo.tokenizer import encode

#: (prompt ids, answer ids) of one example.
Encoded = tuple[list[int], list[int]]
IGNORE = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """Same bits on every run: one thread (also the fastest for these small models on a shared
    machine: with two, each step waits on the busier core) and deterministic kernels. The
    caller's settings are restored afterwards."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], *, both: bool = False
) -> list[Encoded]:
    """(prompt, answer) ids of each example; with `both`, also (prompt, the other
    convention's answer) where the two differ (the pretraining corpus)."""
    return [
        (encode(tokenizer, e.prompt), encode(tokenizer, answer))
        for e in examples
        for answer in (
            (e.answer, e.alternative) if both and e.alternative != e.answer else (e.answer,)
        )
    ]


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A freshly initialised Llama (or Mixtral when `shape.experts` > 0, returning its router
    logits, and so adding the load-balancing loss, when `shape.router_aux_loss` > 0), float32,
    seeded."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    if shape.experts:
        config = MixtralConfig(
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.experts_per_token,
            output_router_logits=shape.router_aux_loss > 0,
            router_aux_loss_coef=shape.router_aux_loss,
            **common,
        )
        return MixtralForCausalLM(config)
    return LlamaForCausalLM(LlamaConfig(**common))


def with_lora(model: PreTrainedModel, rank: int, seed: int) -> PeftModel:
    """`model` wrapped with a fresh LoRA adapter (alpha = 2 x rank) on every linear layer."""
    from peft import LoraConfig, get_peft_model  # lazy: peft takes seconds; only LoRA stages

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs; the loss is taken on the answer tokens only."""
    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(batch):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : n] = torch.tensor(answer)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(
    model: torch.nn.Module,
    pools: Sequence[Sequence[Encoded]],
    schedule: Schedule,
    *,
    pad_id: int,
    seed: int,
    log: Callable[[str], None],
    label: str,
) -> float:
    """Train in place on batches that draw a pool uniformly, then an example of it; return
    the mean loss of the last tenth of the steps."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)

    def factor(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    tail: list[float] = []
    for step in range(schedule.steps):
        batch = [rng.choice(rng.choice(pools)) for _ in range(schedule.batch_size)]
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= schedule.steps - max(1, schedule.steps // 10):
            tail.append(loss.item())
        if (step + 1) % max(1, schedule.steps // 4) == 0:
            log(f"{label}: step {step + 1}/{schedule.steps} loss {loss.item():.3f}")
    model.eval()
    return sum(tail) / len(tail)
