"""A tiny Llama base, two experts near it and their prompts, for the learned-coefficient
methods (AdaMerging, Concrete); and naive references: the merged state by a per-tensor loop,
the entropy objective by one unpadded forward per prompt and a sum over the vocabulary."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import parse_recipe
from amalgam.statistics.data import load_examples
from amalgam.statistics.learning import Problem, build_problem, prompt_text
from tests.statistics.tiny_models import RECORDS, tiny_llama, write_jsonl


@dataclass(frozen=True)
class Setup:
    base: Path
    experts: list[Path]
    data: list[Path]


def build_setup(root: Path) -> Setup:
    """A 2-layer Llama base and two experts (base + seeded noise of scale 0.05)."""
    base = tiny_llama(root / "base", seed=0)
    experts = []
    for i in (1, 2):
        model = LlamaForCausalLM.from_pretrained(base)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        folder = root / f"expert{i}"
        model.save_pretrained(folder)
        for f in base.iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copy(f, folder / f.name)
        experts.append(folder)
    data = [
        write_jsonl(root / "data0.jsonl", RECORDS[:4]),
        write_jsonl(root / "data1.jsonl", RECORDS[2:]),
    ]
    return Setup(base, experts, data)


def recipe(setup: Setup, method: str, params: dict[str, Any], **extra: Any) -> Any:
    models = [
        {"uri": str(e), "name": f"e{i}", "data": str(d)}
        for i, (e, d) in enumerate(zip(setup.experts, setup.data, strict=True))
    ]
    return parse_recipe(
        {"method": method, "base": str(setup.base), "models": models, "params": params, **extra}
    )


def merge(setup: Setup, method: str, params: dict[str, Any], out: Path, **extra: Any) -> Path:
    options = MergeOptions(output=str(out), overwrite=True, device="cpu", threads=1)
    run_merge(recipe(setup, method, params, **extra), options)
    return out


def problem(setup: Setup) -> Problem:
    model = LlamaForCausalLM.from_pretrained(setup.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup.base)
    base = open_checkpoint(str(setup.base))
    experts = [open_checkpoint(str(e)) for e in setup.experts]
    examples = [load_examples(str(d))[0] for d in setup.data]
    built, _ = build_problem(model, tokenizer, base, experts, examples, set(base.names()), 256)
    return built


def states(setup: Setup) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = load_file(setup.base / "model.safetensors")
    return base, [load_file(e / "model.safetensors") for e in setup.experts]


def naive_state(
    setup: Setup, coefficients: dict[str, Sequence[float]], masks: dict | None = None
) -> dict[str, torch.Tensor]:
    """base + sum_k c_k (mask * (expert_k - base)), tensor by tensor, model by model."""
    base, experts = states(setup)
    out = {}
    for name, w0 in base.items():
        w = w0.clone().double()
        for c, e in zip(coefficients[name], experts, strict=True):
            delta = e[name].double() - w0.double()
            if masks is not None:
                delta = delta * masks[name].double()
            w += c * delta
        out[name] = w.float()
    return out


def naive_entropy(setup: Setup, state: dict[str, torch.Tensor], data: Path) -> float:
    """Mean over the prompts of -sum_v p_v log p_v at each prompt's last position, one
    unpadded forward per prompt, the model loaded with ``state``."""
    model = LlamaForCausalLM.from_pretrained(setup.base).eval()
    model.load_state_dict(state, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(setup.base)
    values = []
    for e in load_examples(str(data))[0]:
        ids = tokenizer(prompt_text(e), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        probs = torch.softmax(logits, dim=-1).tolist()
        values.append(-sum(p * math.log(p) for p in probs if p > 0))
    return sum(values) / len(values)


def naive_loss(setup: Setup, state: dict[str, torch.Tensor]) -> float:
    """The objective: the sum over the models' data of the mean entropy."""
    return sum(naive_entropy(setup, state, d) for d in setup.data)


def learned_table(home: Path) -> tuple[dict[str, tuple[float, ...]], dict[str, torch.Tensor]]:
    """The one learned artifact under ``home``: its coefficient table and masks."""
    from amalgam.statistics.artifact import read_info
    from amalgam.statistics.learning import COEFFICIENTS, read_table

    (path,) = (home / "learned").glob("*.safetensors")
    info = read_info(str(path))
    with open_checkpoint(str(path)) as ckpt:
        table = read_table(info, ckpt)
        masks = {n: ckpt.tensor(n) for n in ckpt.names() if n != COEFFICIENTS}
    return table, masks
