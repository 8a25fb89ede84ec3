"""The MoE build config: mergekit-moe's YAML (base model, experts with prompts, gate mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amalgam.config_file import load_yaml
from amalgam.errors import AmalgamError

GateMode = Literal["hidden", "cheap_embed", "random"]
#: mergekit-moe's ``architecture`` values (a case-insensitive prefix picks one) -> the layout
#: amalgam writes, None where amalgam has none.
ARCHITECTURES = {
    "mixtral": "mixtral",
    "qwen moe": "qwen2_moe",
    "deepseek moe": None,
    "qwen3 moe": None,
}


class MoEError(AmalgamError):
    """An MoE cannot be built from this config and these models (the field or file is named)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    """One expert: the dense model whose MLPs become expert ``e`` in every layer, and the
    prompts that say which inputs the router should send to it."""

    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    #: multiplies the expert's down projection (mergekit's ``residual_scale``)
    residual_scale: float | None = None


class MoEConfig(_Strict):
    """mergekit-moe's config (``base_model``, ``experts``, ``gate_mode``, ``dtype``,
    ``experts_per_token``, ``shared_experts``, ``architecture``), plus ``seed`` for
    ``gate_mode: random``. The output is Mixtral, or Qwen2-MoE when a shared expert is given
    or ``architecture`` says Qwen MoE; ``noise_scale`` is refused by name."""

    base_model: str
    experts: list[ExpertSpec]
    shared_experts: list[ExpertSpec] = Field(default_factory=list)
    gate_mode: GateMode = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = Field(2, ge=1)
    architecture: str | None = None
    seed: int = 0

    @property
    def output_architecture(self) -> str:
        """The layout written: ``mixtral`` or ``qwen2_moe``."""
        if self.architecture is None:
            return "qwen2_moe" if self.shared_experts else "mixtral"
        wanted = self.architecture.strip().lower()
        return next(v for k, v in ARCHITECTURES.items() if v and k.startswith(wanted))

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        if not self.experts:
            raise ValueError("experts: at least one expert is needed")
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than the "
                f"{len(self.experts)} experts"
            )
        if self.architecture is not None:
            wanted = self.architecture.strip().lower()
            found = [v for k, v in ARCHITECTURES.items() if wanted and k.startswith(wanted)]
            if not found or found[0] is None:
                raise ValueError(
                    f"architecture: {self.architecture!r}; amalgam writes Mixtral or Qwen MoE "
                    f"(mergekit-moe also knows DeepSeek MoE and Qwen3 MoE)"
                )
        arch = self.output_architecture
        if arch == "mixtral" and self.shared_experts:
            raise ValueError("shared_experts: Mixtral has no shared expert (use Qwen MoE)")
        if arch == "qwen2_moe" and len(self.shared_experts) != 1:
            raise ValueError("shared_experts: Qwen MoE needs exactly one shared expert")
        if self.gate_mode != "random":
            named = [("experts", self.experts), ("shared_experts", self.shared_experts)]
            for field, specs in named:
                missing = [i for i, e in enumerate(specs) if not e.positive_prompts]
                if missing:
                    raise ValueError(
                        f"{field}.{missing[0]}.positive_prompts: gate_mode {self.gate_mode} "
                        "needs positive prompts for every expert (or use gate_mode: random)"
                    )
            prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise ValueError("experts: every expert has the same prompts; routers would tie")
        return self


def _refused(data: dict[str, Any]) -> list[str]:
    """``noise_scale`` wherever given (mergekit's noise on an expert's MLP: not supported)."""
    found = []
    for field in ("experts", "shared_experts"):
        specs = data.get(field)
        for i, expert in enumerate(specs if isinstance(specs, list) else []):
            if isinstance(expert, dict) and "noise_scale" in expert:
                found.append(f"{field}.{i}.noise_scale: not supported")
    return found


def parse_moe_config(data: Any, source: str = "moe config") -> MoEConfig:
    """Validate a parsed mergekit-moe YAML mapping; every problem names its field."""
    if not isinstance(data, dict):
        raise MoEError(f"{source}: expected a mapping at the top level")
    problems = _refused(data)
    if not problems:
        try:
            return MoEConfig.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                msg = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"{loc}: {msg}" if loc else msg)
    raise MoEError(f"{source}: invalid MoE config:\n  " + "\n  ".join(problems))


def load_moe_config(path: str | Path) -> MoEConfig:
    """Read a mergekit-moe YAML file (``${VAR}`` expanded as in recipes)."""
    return parse_moe_config(load_yaml(path, "MoE config"), str(path))
