"""Router initialisation for an MoE built from dense experts: one gate row per expert per layer.

The rules are mergekit-moe's (``gate_mode``):

- ``hidden``: the base model reads each prompt (the tokenizer's BOS id first, no other special
  tokens); the vector for layer ``l`` is the hidden state *entering* layer ``l`` (``l = 0``:
  the embeddings) at the prompt's last token, averaged over the expert's positive prompts,
  minus the same average over its negative prompts if it has any; each (layer, expert) vector
  is then divided by its L2 norm (clamped at 1e-8). Prompts run one at a time, unpadded, so
  no pad token enters the average (mergekit left-pads a batch).
- ``cheap_embed``: the sum of the input-embedding rows of every token of the positive
  prompts, minus that of the negative prompts, L2-normalised; the same row in every layer.
  Only the embedding tensor is read.
- ``random``: N(0, 1) entries from a ``torch.Generator`` seeded with the config's ``seed``,
  unnormalised.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import torch

from amalgam import storage
from amalgam.checkpoint import TOKENIZER_FILES, Checkpoint
from amalgam.moe.config import ExpertSpec, MoEConfig, MoEError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBED = "model.embed_tokens.weight"


def gate_weights(config: MoEConfig, base: Checkpoint) -> torch.Tensor:
    """The router rows of every layer, float32, shape (layers, experts + shared experts,
    hidden): the experts' rows, then the shared experts' (Qwen2-MoE's shared-expert gate)."""
    layers = int(base.config["num_hidden_layers"])
    hidden = int(base.config["hidden_size"])
    specs = [*config.experts, *config.shared_experts]
    experts = len(specs)
    if config.gate_mode == "random":
        generator = torch.Generator().manual_seed(config.seed)
        return torch.randn((layers, experts, hidden), generator=generator, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    if config.gate_mode == "cheap_embed":
        rows = cheap_embed_rows(specs, base.tensor(EMBED).float(), tokenizer)
        return normalise(rows).unsqueeze(0).expand(layers, -1, -1).contiguous()
    model = load_model(base)
    vectors = []
    for expert in specs:
        v = mean_hidden(model, tokenizer, expert.positive_prompts)
        if expert.negative_prompts:
            v = v - mean_hidden(model, tokenizer, expert.negative_prompts)
        vectors.append(v)
    return normalise(torch.stack(vectors, dim=1))


def normalise(rows: torch.Tensor) -> torch.Tensor:
    """Each row (last dimension) divided by its L2 norm, clamped at 1e-8."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A prompt's token ids: the BOS id (when the tokenizer has one), then the text's."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def mean_hidden(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> torch.Tensor:
    """(layers, hidden): per layer, the hidden state entering it at each prompt's last token,
    averaged over the prompts."""
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[:-1]
            rows.append(torch.stack([h[0, -1].float() for h in states]))
    return torch.stack(rows).mean(0)


def cheap_embed_rows(
    specs: list[ExpertSpec], embed: torch.Tensor, tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """(experts, hidden): embedding rows summed over the positive prompts' tokens, minus
    those of the negative prompts (unnormalised)."""

    def summed(prompts: list[str]) -> torch.Tensor:
        ids = [i for p in prompts for i in prompt_ids(tokenizer, p)]
        return embed[torch.tensor(ids, dtype=torch.long)].sum(0)

    rows = []
    for expert in specs:
        row = summed(expert.positive_prompts)
        if expert.negative_prompts:
            row = row - summed(expert.negative_prompts)
        rows.append(row)
    return torch.stack(rows)


def load_tokenizer(base: Checkpoint) -> PreTrainedTokenizerBase:
    """The base's tokenizer, from wherever the base lives (its files copied to a temp folder)."""
    # lazy: transformers takes seconds to import; gate_mode random never needs it
    from transformers import AutoTokenizer

    files = [f for f in base.side_files() if f in TOKENIZER_FILES or f == "config.json"]
    if not any(f in TOKENIZER_FILES for f in files):
        raise MoEError(
            f"{base.uri}: no tokenizer files; gate modes hidden and cheap_embed need one"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            base.fs.get(storage.join(base.root, name), f"{tmp}/{name}")
        return AutoTokenizer.from_pretrained(tmp)


def load_model(base: Checkpoint) -> PreTrainedModel:
    """The base model in float32, its tensors read from the checkpoint (any storage)."""
    # lazy: transformers takes seconds to import; only gate_mode hidden runs the model
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(base.config)
    model_type = settings.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
    state = {name: base.tensor(name).float() for name in base.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise MoEError(
            f"{base.uri}: tensors do not fit its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model.eval()
