"""Extract a PEFT LoRA adapter from a fine-tune (or a merge) and its base, one module at a time.

For each target module (a 2-D ``<module>.weight``), the delta D = W - W0 is factored by a
thin SVD, D = U diag(s) V^T, and truncated to rank k: B = U_k diag(sqrt(s_k)),
A = diag(sqrt(s_k)) V_k^T, so that B A is the best rank-k approximation of D (Eckart-Young)
at PEFT scale 1 (alpha = r). The square root is split between the factors so that both have
the same scale (what ``mergekit-extract-lora`` does by default). k is a fixed rank, or per
module the smallest rank whose kept energy sum(s_k^2) / sum(s^2) reaches a threshold. The
retained energy of every module is reported.

The SVD is exact (``torch.linalg.svd``, float32): the energy threshold needs the whole
spectrum, and fine-tuning deltas have flat spectra on which a randomized range finder
(``svd_lowrank``) loses accuracy without warning. Only one dense delta is held at a time;
the factors, small by construction, are kept until the adapter file is written.

Tensors outside the target modules that differ from the base (embeddings, norms, lm_head)
are saved whole through ``modules_to_save``, or left out when asked. A target module whose
bias changed gets the bias delta as ``lora_B.bias`` (PEFT's ``lora_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from amalgam import storage
from amalgam.adapters.peft_config import peft_key
from amalgam.adapters.peft_write import AdapterTensor, adapter_config, write_adapter
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.device import compute_threads, pick_device
from amalgam.engine.inputs import check_output
from amalgam.errors import AmalgamError
from amalgam.methods.svd import numerical_rank

DEFAULT_RANK = 16
# last name components of input and output embeddings: never LoRA targets by default
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "wte", "embed_in", "word_embeddings"})
EMBEDDINGS = INPUT_EMBEDDINGS | {"lm_head", "wpe", "embed_out"}
HEAD = "lm_head"  # the output embedding of Hugging Face *ForCausalLM models


class ExtractError(AmalgamError):
    """An adapter cannot be extracted (model and base do not fit, bad targets or settings)."""


@dataclass(frozen=True)
class ModuleReport:
    """One LoRA module: its weight's shape (out, in), the rank kept and the energy retained."""

    module: str
    shape: tuple[int, int]
    rank: int
    energy: float


@dataclass
class ExtractResult:
    """Where the adapter went, its LoRA modules, the modules saved whole, and the changed
    tensors left out (``save_modules=False``)."""

    output: str
    modules: list[ModuleReport]
    saved: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        energies = [m.energy for m in self.modules]
        return {
            "output": self.output,
            "modules": len(self.modules),
            "ranks": sorted({m.rank for m in self.modules}),
            "energy_min": min(energies),
            "energy_mean": sum(energies) / len(energies),
            "modules_to_save": self.saved,
            "dropped": self.dropped,
            "per_module": [
                {"module": m.module, "shape": list(m.shape), "rank": m.rank, "energy": m.energy}
                for m in self.modules
            ],
        }


def truncated_factors(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, retained energy) of the rank-k truncated SVD of ``delta`` (out x in), float32,
    with B A the best rank-k approximation. k is ``rank`` (at most min(out, in)) or the
    smallest rank whose share of sum(s^2) reaches ``energy``, at most the numerical rank
    (``torch.linalg.matrix_rank``'s tolerance); at least 1. A zero delta gives zero factors
    and energy 1."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    cumulative = torch.cumsum(s.square().double(), 0)
    total = float(cumulative[-1])
    if energy is not None:
        # singular values below float32 rounding of the largest are noise, never kept
        k = min(int((cumulative < energy * total).sum()) + 1, numerical_rank(s, delta.shape))
    elif rank is not None:
        k = rank
    else:
        raise ValueError("give rank or energy")
    k = max(1, min(k, s.numel()))
    root = s[:k].sqrt()
    kept = float(cumulative[k - 1]) / total if total > 0 else 1.0
    return u[:, :k] * root, root[:, None] * vh[:k], kept


def extract_lora(
    base_uri: str,
    model_uri: str,
    output_uri: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    targets: list[str] | None = None,
    save_modules: bool = True,
    base_name: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    **storage_options: Any,
) -> ExtractResult:
    """Extract ``model_uri - base_uri`` as a PEFT LoRA adapter folder at ``output_uri``.

    ``rank`` (default :data:`DEFAULT_RANK`) or ``energy`` (in (0, 1]) sets each module's rank.
    ``targets`` are module names or last name components (PEFT's suffix rule); by default every
    2-D weight except the embeddings. ``base_name`` goes to ``base_model_name_or_path``
    (default: the base's location); ``metadata`` goes to the adapter file's header. The SVDs
    run on ``device`` (auto: CUDA when present) with ``threads`` compute threads on the CPU.
    Nothing is left at ``output_uri`` on failure.
    """
    rank = _checked_rank(rank, energy)
    target = pick_device(device)
    with (
        compute_threads(threads),
        open_checkpoint(base_uri, **storage_options) as base,
        open_checkpoint(model_uri, **storage_options) as model,
    ):
        _check_fit(base, model)
        check_output(output_uri, {"model": model, "base": base}, overwrite, storage_options)
        modules = _target_modules(model, targets)
        changed = _changed_outside(base, model, modules)
        lora_bias = any(m + ".bias" in changed for m in modules)
        changed -= {m + ".bias" for m in modules}
        sources = _modules_to_save(model, changed) if save_modules else {}
        factors, reports = _factorize(base, model, modules, rank, energy, target)
        config = adapter_config(
            base_name or storage.full_uri(base.fs, base.path),
            {r.module: r.rank for r in reports},
            _target_names(model, modules),
            sorted(sources),
            lora_bias=lora_bias,
            tie_weights=sources.get(HEAD, HEAD) != HEAD,
        )
        tensors = _lora_tensors(base, model, factors, lora_bias) + _saved_tensors(model, sources)
        output = write_adapter(
            output_uri,
            config,
            tensors,
            sources=[base, model],
            overwrite=overwrite,
            metadata=metadata,
            **storage_options,
        )
    dropped = [] if save_modules else sorted(changed)
    return ExtractResult(output, reports, sorted(sources), dropped)


def _factorize(
    base: Checkpoint,
    model: Checkpoint,
    modules: list[str],
    rank: int | None,
    energy: float | None,
    device: torch.device,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[ModuleReport]]:
    """Each module's (B, A) in the model's dtype on the CPU, and its report; one dense delta
    at a time, its SVD on ``device``."""
    factors, reports = {}, []
    for module in modules:
        weight = module + ".weight"
        delta = _delta(base, model, weight)
        b, a, kept = truncated_factors(delta.to(device), rank, energy)
        dtype = model.dtype(weight)
        factors[module] = (b.to("cpu", dtype), a.to("cpu", dtype))
        reports.append(ModuleReport(module, tuple(delta.shape), a.shape[0], kept))
        del delta, b, a
    return factors, reports


def _modules_to_save(model: Checkpoint, changed: set[str]) -> dict[str, str]:
    """The modules saved whole -> the model's module whose tensors they take: the owners of
    the changed tensors, and a head tied to a changed input embedding (that embedding)."""
    saved = sorted({n.rsplit(".", 1)[0] for n in changed})
    sources = {m: m for m in saved}
    tied = _tied_embedding(model, saved)
    if tied:
        sources[HEAD] = tied
    return sources


def _checked_rank(rank: int | None, energy: float | None) -> int | None:
    """The fixed rank to use (the default when neither is given), or None for ``energy``."""
    if rank is not None and energy is not None:
        raise ExtractError("extract: give either a rank or an energy threshold, not both")
    if energy is not None:
        if not 0 < energy <= 1:
            raise ExtractError(f"extract: energy must be in (0, 1], got {energy}")
        return None
    rank = DEFAULT_RANK if rank is None else rank
    if rank < 1:
        raise ExtractError(f"extract: rank must be at least 1, got {rank}")
    return rank


def _check_fit(base: Checkpoint, model: Checkpoint) -> None:
    """Two full models (no adapter), the same tensor names, each with the same shape; the
    first misfit is the error."""
    for ckpt in (base, model):
        if ckpt.kind == "adapter":
            raise ExtractError(
                f"{ckpt.uri}: a PEFT adapter, not a full model; extract-lora takes a base and a "
                "full fine-tune or merge of it"
            )
    for name, info in model.tensors.items():
        if name not in base.tensors:
            raise ExtractError(f"tensor '{name}': in {model.uri} but not in the base {base.uri}")
        if base.shape(name) != info.shape:
            raise ExtractError(
                f"tensor '{name}': shape {list(info.shape)} in {model.uri} but "
                f"{list(base.shape(name))} in the base {base.uri}"
            )
    for name in base.tensors:
        if name not in model.tensors:
            raise ExtractError(f"tensor '{name}': in the base {base.uri} but not in {model.uri}")


def _matches(module: str, target: str) -> bool:
    """PEFT's target rule: the module's full name, or a suffix after a dot."""
    return module == target or module.endswith("." + target)


def _target_modules(model: Checkpoint, targets: list[str] | None) -> list[str]:
    """The LoRA modules: owners of 2-D float weights, named by ``targets`` or (default) not
    embeddings, sorted by name."""
    linear = sorted(
        name.removesuffix(".weight")
        for name, info in model.tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2 and info.is_float
    )
    if targets is None:
        chosen = [m for m in linear if m.rsplit(".", 1)[-1] not in EMBEDDINGS]
    else:
        chosen = [m for m in linear if any(_matches(m, t) for t in targets)]
        for t in targets:
            if not any(_matches(m, t) for m in chosen):
                raise ExtractError(f"--targets {t}: matches no 2-D weight of {model.uri}")
    if not chosen:
        raise ExtractError(f"{model.uri}: no 2-D weight to extract a LoRA module from")
    return chosen


def _target_names(model: Checkpoint, modules: list[str]) -> list[str]:
    """``target_modules`` for PEFT: a last name component where every module of the model of
    that name is a target (PEFT matches it as a suffix), else the full module names."""
    owners = {n.rsplit(".", 1)[0] for n in model.tensors if "." in n}
    chosen = set(modules)
    names = set()
    for module in modules:
        last = module.rsplit(".", 1)[-1]
        same = {o for o in owners if _matches(o, last)}
        names |= {last} if same <= chosen else {module}
    return sorted(names)


def _delta(base: Checkpoint, model: Checkpoint, name: str) -> torch.Tensor:
    delta = model.tensor(name).float() - base.tensor(name).float()
    if not bool(torch.isfinite(delta).all()):
        raise ExtractError(f"tensor '{name}': NaN or Inf in {model.uri} or its base {base.uri}")
    return delta


def _changed_outside(base: Checkpoint, model: Checkpoint, modules: list[str]) -> set[str]:
    """Tensors not a target's weight that differ from the base (read one pair at a time)."""
    weights = {m + ".weight" for m in modules}
    return {
        name
        for name in model.tensors
        if name not in weights and not torch.equal(model.tensor(name), base.tensor(name))
    }


def _lora_tensors(
    base: Checkpoint,
    model: Checkpoint,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    lora_bias: bool,
) -> list[AdapterTensor]:
    out = []
    for module, (b, a) in factors.items():
        out.append(
            AdapterTensor(peft_key(module, "lora_A.weight"), a.dtype, a.shape, lambda a=a: a)
        )
        out.append(
            AdapterTensor(peft_key(module, "lora_B.weight"), b.dtype, b.shape, lambda b=b: b)
        )
        if lora_bias:
            out.append(
                AdapterTensor(
                    peft_key(module, "lora_B.bias"),
                    b.dtype,
                    (b.shape[0],),
                    lambda m=module, b=b: _bias_delta(base, model, m, b),
                )
            )
    return out


def _bias_delta(base: Checkpoint, model: Checkpoint, module: str, b: torch.Tensor) -> torch.Tensor:
    """The bias change of a target module, zero where it has no bias."""
    name = module + ".bias"
    if name not in model.tensors:
        return torch.zeros(b.shape[0], dtype=b.dtype)
    return _delta(base, model, name).to(b.dtype)


def _tied_embedding(model: Checkpoint, saved: list[str]) -> str | None:
    """The saved input embedding that the output head shares (no head tensor in the
    checkpoint, and a config that does not untie them), else None. PEFT must then save the
    head too, as a copy of it, and tie the two (``ensure_weight_tying``): a changed embedding
    saved alone would leave the head on the base's weights."""
    config = model.config or {}
    if HEAD + ".weight" in model.tensors or config.get("tie_word_embeddings") is False:
        return None
    return next((m for m in saved if m.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS), None)


def _saved_tensors(model: Checkpoint, sources: dict[str, str]) -> list[AdapterTensor]:
    """Every parameter of the modules saved whole (module -> the model's module that holds
    its weights: itself, or the embedding a tied head shares), read when written."""
    out = []
    for module, source in sorted(sources.items()):
        for name, info in model.tensors.items():
            if name.rsplit(".", 1)[0] == source:
                part = name.rsplit(".", 1)[1]
                out.append(
                    AdapterTensor(
                        peft_key(module, part),
                        info.torch_dtype,
                        info.shape,
                        lambda n=name: model.tensor(n),
                    )
                )
    return out
