"""Per-task routing of an MoE: the share of the top-k slots each expert gets on a task's prompts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from statistics import mean
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

#: task -> layer -> share of the top-k slots routed to each expert (sums to 1 per layer).
Routing = dict[str, list[list[float]]]


def routing_shares(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Mapping[str, Sequence[str]],
) -> Routing:
    """Run every prompt of every task alone (so no pad token is routed) through the Mixtral- or
    Qwen2-MoE-style `model` and count, per layer, the experts its routers pick."""
    import torch  # lazy: the zoo's report imports this module, a cached zoo needs no torch

    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    layers = model.model.layers
    counts = [torch.zeros(experts, dtype=torch.long) for _ in layers]

    def hook(layer: int) -> Any:
        def count(_module: Any, _args: Any, output: Any) -> None:
            counts[layer] += torch.bincount(output[2].reshape(-1), minlength=experts)

        return count

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    table: Routing = {}
    try:
        with torch.inference_mode():
            for task, texts in prompts.items():
                for c in counts:
                    c.zero_()
                for text in texts:
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    model(input_ids=torch.tensor([ids]))
                table[task] = [(c / c.sum()).tolist() for c in counts]
    finally:
        for handle in handles:
            handle.remove()
    return table


def task_separation(routing: Routing) -> float:
    """Mean over layers and pairs of tasks of the total-variation distance between the two
    tasks' routing shares: 0 when every task is routed alike, 1 when no two share an expert."""
    tasks = list(routing.values())
    return mean(
        sum(abs(x - y) for x, y in zip(a[layer], b[layer], strict=True)) / 2
        for layer in range(len(tasks[0]))
        for a, b in combinations(tasks, 2)
    )
