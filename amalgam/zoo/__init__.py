"""The benchmark model zoo: a small Llama base, full and LoRA fine-tunes per task, an MoE, tasks."""

from amalgam.zoo.build import Zoo, ZooError, build_zoo, default_zoo_dir
from amalgam.zoo.profiles import PROFILES

__all__ = ["PROFILES", "Zoo", "ZooError", "build_zoo", "default_zoo_dir"]
