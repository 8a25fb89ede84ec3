"""An MoE's expert layout (from its config and tensors) and its routing statistics on
calibration data (MC-SMoE, arXiv 2310.01334, step 1), cached as a statistics artifact.

Per MoE layer the artifact holds ``<gate>.counts`` (E,): how often each expert is among a
token's top-k, and ``<gate>.logit_gram`` (E, E): Zᵀ Z of the router logits Z (tokens x E), from
which the paper's similarity, the cosine of two experts' logit columns, follows exactly.
Both are sums over tokens, so examples run one at a time (unpadded) and add up; the model is
loaded once, in float32, for the pass (its memory: the model's parameters in float32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from amalgam import storage
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.compress.errors import CompressError
from amalgam.errors import StatisticsError
from amalgam.moe.layout import LAYOUTS, Layout
from amalgam.statistics.artifact import StatisticsInfo, read_info, write_artifact
from amalgam.statistics.compute import cache_path
from amalgam.statistics.data import encode, load_examples

#: model_type -> the config field holding the expert count.
EXPERT_COUNT = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts"}
VERSION = 1


@dataclass(frozen=True)
class MoELayout:
    """Where an MoE checkpoint keeps its routers and experts: the naming ``layout``, the
    layers with a router, experts per layer, experts chosen per token, the count's field."""

    layout: Layout
    layers: tuple[int, ...]
    experts: int
    top_k: int
    count_field: str

    def expert_tensors(self, layer: int, expert: int) -> dict[str, str]:
        """projection (gate/up/down) -> tensor name."""
        return {p: self.layout.expert(layer, expert, p) for p in self.layout.weights}


def moe_layout(ckpt: Checkpoint) -> MoELayout:
    """The layout of ``ckpt``, derived from its config (model_type, expert count, top-k) and
    the router tensors it holds; a clear error for a dense model."""
    cfg = ckpt.config or {}
    kind = cfg.get("model_type")
    if kind not in EXPERT_COUNT:
        raise CompressError(
            f"{ckpt.uri}: model_type {kind!r} is not a mixture of experts; mc_smoe compresses "
            f"{' or '.join(EXPERT_COUNT)} checkpoints"
        )
    layout = LAYOUTS[kind]
    gate = re.compile(re.escape(layout.gate(0)).replace("\\.0\\.", r"\.(\d+)\."))
    layers = sorted(int(m.group(1)) for n in ckpt.names() if (m := gate.fullmatch(n)))
    if not layers:
        raise CompressError(f"{ckpt.uri}: no router tensors named like {layout.gate(0)}")
    experts = int(cfg[EXPERT_COUNT[kind]])
    return MoELayout(
        layout, tuple(layers), experts, int(cfg["num_experts_per_tok"]), EXPERT_COUNT[kind]
    )


def routing_statistics(
    model: Any, sequences: list[list[int]], layout: MoELayout
) -> tuple[dict[str, torch.Tensor], int]:
    """({<gate>.counts, <gate>.logit_gram} per MoE layer, tokens seen): each sequence run
    alone through ``model`` (transformers, ``output_router_logits``)."""
    e = layout.experts
    counts = {layer: torch.zeros(e, dtype=torch.float64) for layer in layout.layers}
    grams = {layer: torch.zeros(e, e, dtype=torch.float64) for layer in layout.layers}
    tokens = 0
    with torch.inference_mode():
        for ids in sequences:
            out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
            if len(out.router_logits) != len(layout.layers):
                raise CompressError(
                    f"the model returned {len(out.router_logits)} router outputs for "
                    f"{len(layout.layers)} MoE layers"
                )
            for layer, logits in zip(layout.layers, out.router_logits, strict=True):
                z = logits.reshape(-1, e).double()
                top = z.topk(layout.top_k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(top, minlength=e).double()
                grams[layer] += z.T @ z
            tokens += len(ids)
    tensors = {}
    for layer in layout.layers:
        gate = layout.layout.gate(layer)
        tensors[f"{gate}.counts"] = counts[layer].float()
        tensors[f"{gate}.logit_gram"] = grams[layer].float()
    return tensors, tokens


def frequencies(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the layer's top-k selections."""
    return counts / counts.sum().clamp_min(1e-12)


def similarity(gram: torch.Tensor) -> torch.Tensor:
    """The paper's router-logit similarity, (cos + 1) / 2 of every pair of logit columns."""
    norms = gram.diagonal().clamp_min(1e-12).sqrt()
    return (gram / norms[:, None] / norms[None, :] + 1) / 2


def cached_routing(
    model_uri: str, calibration: str, samples: int, **storage_options: Any
) -> tuple[StatisticsInfo, bool]:
    """The routing statistics of the MoE at ``model_uri`` (a local folder) on the first
    ``samples`` records of ``calibration``, from ``$AMALGAM_HOME/statistics`` (keyed by the
    model's content hash, the data's hash and the settings) or computed now. Returns (info,
    whether computed now)."""
    try:
        examples, data_hash = load_examples(calibration, **storage_options)
    except StatisticsError as exc:
        raise CompressError(f"compress.calibration: {exc}") from None
    settings = {"samples": samples, "version": VERSION}
    with open_checkpoint(model_uri) as ckpt:
        if not storage.is_local(ckpt.fs):
            raise CompressError(
                f"{model_uri}: mc_smoe runs the MoE on its calibration data; give a local folder"
            )
        model_hash = ckpt.content_hash()
        layout = moe_layout(ckpt)
        path = cache_path(model_hash, data_hash, "routing", settings)
        if path.is_file():
            return read_info(str(path)), False
        # lazy: transformers takes seconds to import; only the calibration pass needs it
        from amalgam.device import load_causal_lm

        model, tokenizer = load_causal_lm(ckpt.root, "cpu")
        limit = int(ckpt.config.get("max_position_embeddings") or 2048)
        sequences = [list(e.ids) for e in encode(tokenizer, examples[:samples], limit)]
    tensors, tokens = routing_statistics(model, [s for s in sequences if s], layout)
    info = write_artifact(
        str(path),
        tensors,
        kind="routing",
        model_hash=model_hash,
        data_hash=data_hash,
        samples=len(sequences),
        tokens=tokens,
        settings=settings,
    )
    return info, True
