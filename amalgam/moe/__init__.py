"""Mixture-of-experts assembly: a Mixtral-style MoE built from dense fine-tunes (mergekit-moe)."""

from amalgam.moe.build import MoEResult, build_moe
from amalgam.moe.config import ExpertSpec, MoEConfig, MoEError, load_moe_config, parse_moe_config

__all__ = [
    "ExpertSpec",
    "MoEConfig",
    "MoEError",
    "MoEResult",
    "build_moe",
    "load_moe_config",
    "parse_moe_config",
]
