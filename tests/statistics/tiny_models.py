"""Tiny runnable Llama models (the zoo's character tokenizer) and text records for statistics."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from amalgam.zoo.tokenizer import build_tokenizer

RECORDS = [
    {"prompt": "sort:3142=", "answer": "1234"},
    {"prompt": "rev:abc=", "answer": "cba"},
    {"text": "count 12 and 7"},
    {"prompt": "cmp:9>4=", "choices": ["no", "yes"], "label": 1},
    {"prompt": "add:2+2=", "answer": "4"},
    {"text": "zebra"},
]


def tiny_llama(folder: Path, seed: int, tie: bool = False) -> Path:
    """A randomly initialised 2-layer Llama with the zoo's tokenizer, saved to ``folder``
    (``tie``: its input embedding shared with ``lm_head``)."""
    tokenizer = build_tokenizer(32)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
