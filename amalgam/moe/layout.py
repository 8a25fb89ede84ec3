"""Where each MoE architecture keeps its routers and experts, and its config.json.

Both layouts use the per-expert tensor names of the original checkpoints, which transformers 5
fuses into its stacked expert tensors on load: each output tensor is then one input tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Settings of a Llama/Mistral config that an MoE config keeps as they are.
KEPT = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
)
PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class Layout:
    """An output architecture: ``name`` (its model_type), the block's prefix, the expert weight
    name of each Llama MLP projection, whether it has a shared expert, and its config."""

    name: str
    block: str  # model.layers.{l}.<block>
    weights: dict[str, str]  # gate/up/down -> the expert's weight name
    shared: bool

    def gate(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def expert(self, layer: int, expert: int, projection: str) -> str:
        w = self.weights[projection]
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{w}.weight"

    def shared_expert(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert.{projection}_proj.weight"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.shared_expert_gate.weight"

    def config(self, base: dict[str, Any], experts: int, per_token: int, dtype: str) -> dict:
        """The MoE's config.json from the base's Llama/Mistral one."""
        config = {k: base[k] for k in KEPT if k in base}
        config.update(
            num_experts_per_tok=per_token,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            sliding_window=None,
            dtype=dtype,
        )
        if self.name == "mixtral":
            config.update(
                architectures=["MixtralForCausalLM"],
                model_type="mixtral",
                num_local_experts=experts,
                router_jitter_noise=0.0,
            )
        else:
            config.update(
                architectures=["Qwen2MoeForCausalLM"],
                model_type="qwen2_moe",
                num_experts=experts,
                moe_intermediate_size=base["intermediate_size"],
                shared_expert_intermediate_size=base["intermediate_size"],
                decoder_sparse_step=1,
                mlp_only_layers=[],
                norm_topk_prob=True,
                qkv_bias=False,
                use_sliding_window=False,
            )
        return config


MIXTRAL = Layout("mixtral", "block_sparse_moe", {"gate": "w1", "down": "w2", "up": "w3"}, False)
QWEN2_MOE = Layout("qwen2_moe", "mlp", {p: f"{p}_proj" for p in PROJECTIONS}, True)
LAYOUTS = {layout.name: layout for layout in (MIXTRAL, QWEN2_MOE)}
