"""Merges whose output is one PEFT adapter over the base (``output_format: adapter``).

``concat`` and ``lora_lego`` merge the inputs' factors module by module (never a dense update);
``svd`` merges densely into a hidden scratch folder, tensor by tensor as any merge, then
extracts the merged update per module (:func:`amalgam.adapters.extract.extract_lora`).
"""

from __future__ import annotations

import logging
import resource
import time
import uuid
from pathlib import PurePosixPath

import torch

from amalgam import storage
from amalgam.adapters.extract import extract_lora
from amalgam.adapters.factor_merge import Factors, concat, lora_lego
from amalgam.adapters.open import AdapterCheckpoint
from amalgam.adapters.peft_config import peft_key
from amalgam.adapters.peft_write import AdapterTensor, adapter_config, write_adapter
from amalgam.checkpoint import Checkpoint
from amalgam.engine import MergeOptions, MergeResult, open_recipe_inputs, plan_recipe, run_merge
from amalgam.engine.inputs import plan_inputs
from amalgam.engine.options import output_of
from amalgam.engine.plan import Plan
from amalgam.errors import PlanError
from amalgam.methods.params import resolve_params
from amalgam.recipe import AdapterOutputSpec, Recipe
from amalgam.writer import remove_folder, remove_stale_staging, staging_prefix

log = logging.getLogger(__name__)

SCRATCH = "dense"  # the hidden folder of an svd output's dense merge (see staging_prefix)


def merge_recipe(
    recipe: Recipe, options: MergeOptions | None = None, progress: object = None
) -> MergeResult:
    """Merge ``recipe``: :func:`amalgam.engine.run_merge`, or for ``output_format: adapter``
    the adapter merge its ``adapter_output`` names."""
    options = options or MergeOptions()
    if recipe.output_format == "dense":
        return run_merge(recipe, options, progress)
    spec = recipe.adapter_output or AdapterOutputSpec()
    start = time.perf_counter()
    if spec.method == "svd":
        plan, read = _svd(recipe, options, spec, progress)
    else:
        plan, read = _factor_merge(recipe, options, spec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MergeResult(output_of(recipe, options), plan, time.perf_counter() - start, read, peak)


def coefficients(recipe: Recipe, name: str, num_layers: int) -> list[float]:
    """Each model's factor in the merged update of tensor ``name``: the merge is
    ``W0 + sum_i c_i (W_i - W0)``. Task arithmetic: ``c_i = lambda w_i`` (over ``sum w`` when
    normalizing); linear: ``w_i / sum w`` (the plain mean when every weight is zero)."""
    p = resolve_params(recipe, recipe.method_spec, name, num_layers)
    weights, normalize = p.each("weight"), p.shared["normalize"]
    total = sum(weights)
    if recipe.method == "linear":
        if not normalize and abs(total - 1.0) > 1e-6:
            raise PlanError(
                f"{name}: linear without normalize sums weights to {total:g}, so the merge is "
                "not the base plus an update: an adapter output needs weights summing to 1"
            )
        if normalize and abs(total) <= 1e-8:
            return [1.0 / len(weights)] * len(weights)
        return [w / total for w in weights] if normalize else list(weights)
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    return [p.shared["lambda"] * w / divisor for w in weights]


def _factor_merge(
    recipe: Recipe, options: MergeOptions, spec: AdapterOutputSpec
) -> tuple[Plan, int]:
    """concat / lora_lego: every model an adapter over the base; each module's factors merged
    with the method's coefficients folded into ``B``; modules the adapters save whole
    (``modules_to_save``) merged densely and saved whole."""
    inputs = open_recipe_inputs(recipe, options)
    try:
        plan = plan_inputs(recipe, inputs, options)
        adapters = _adapters(recipe, inputs, spec)
        whole = sorted({n for a in adapters for n in a.layout.whole})
        patched = sorted({n for a in adapters for n in a.layout.patches} - set(whole))
        merged = {}
        for name in patched:
            parts = _parts(recipe, adapters, name, plan.num_layers)
            rank = spec.rank or max(p.rank for p in parts)
            merged[name] = (
                concat(parts) if spec.method == "concat" else lora_lego(parts, rank, recipe.seed)
            )
        saved = sorted({n.rsplit(".", 1)[0] for n in whole})
        tensors = [t for name in patched for t in _factor_tensors(name, merged[name], adapters)]
        tensors += [
            _whole_tensor(recipe, inputs, adapters, name, plan.num_layers)
            for module in saved
            for name in _module_tensors(inputs["base"], module)
        ]
        ranks = {n.removesuffix(".weight"): m.rank for n, m in merged.items()}
        config = adapter_config(recipe.base, ranks, sorted(ranks), saved)
        so = recipe.storage_options
        output = output_of(recipe, options)
        write_adapter(
            output,
            config,
            tensors,
            sources=inputs.values(),
            overwrite=options.overwrite,
            metadata=plan.metadata,
            **so,
        )
        read = sum(a.adapter.nbytes for a in adapters)
    finally:
        for c in inputs.values():
            c.close()
    return plan, read


def _adapters(
    recipe: Recipe, inputs: dict[str, Checkpoint], spec: AdapterOutputSpec
) -> list[AdapterCheckpoint]:
    """The models as adapters; a full model, a DoRA adapter or an embedding LoRA (whose
    updates are not sums of factors a LoRA layer holds) is refused naming the way out."""
    out = []
    for m in recipe.models:
        ckpt = inputs[m.label]
        why = None
        if not isinstance(ckpt, AdapterCheckpoint):
            why = "is a full model"
        elif any(p.magnitude for p in ckpt.layout.patches.values()):
            why = "is a DoRA adapter (its update is rescaled per row, not a sum of factors)"
        elif any(p.a.endswith("lora_embedding_A") for p in ckpt.layout.patches.values()):
            why = "holds an embedding LoRA"
        if why:
            raise PlanError(
                f"model '{m.label}' ({ckpt.uri}) {why}: adapter_output.method {spec.method} "
                "merges LoRA factors; use adapter_output.method: svd"
            )
        out.append(ckpt)
    return out


def _parts(
    recipe: Recipe, adapters: list[AdapterCheckpoint], name: str, num_layers: int
) -> list[Factors]:
    """Tensor ``name``'s update in each adapter that changes it, as factors with the merge
    coefficient and the LoRA scale folded into ``B`` (a fan_in_fan_out layer's factors
    transposed into the base's layout)."""
    parts = []
    for c, ckpt in zip(coefficients(recipe, name, num_layers), adapters, strict=True):
        patch = ckpt.layout.patches.get(name)
        if patch is None:
            continue
        b = ckpt.adapter.tensor(patch.b).float()
        a = ckpt.adapter.tensor(patch.a).float()
        if patch.transpose:  # (B A)^T = A^T B^T
            b, a = a.T, b.T
        parts.append(Factors(b * (c * patch.scale), a))
    return parts


def _factor_tensors(
    name: str, factors: Factors, adapters: list[AdapterCheckpoint]
) -> list[AdapterTensor]:
    module = name.removesuffix(".weight")
    first = next(a for a in adapters if name in a.layout.patches)
    dtype = first.adapter.info(first.layout.patches[name].a).torch_dtype
    a, b = factors.A.to(dtype).contiguous(), factors.B.to(dtype).contiguous()
    return [
        AdapterTensor(peft_key(module, "lora_A.weight"), dtype, tuple(a.shape), lambda: a),
        AdapterTensor(peft_key(module, "lora_B.weight"), dtype, tuple(b.shape), lambda: b),
    ]


def _module_tensors(base: Checkpoint, module: str) -> list[str]:
    return sorted(n for n in base.tensors if n.rsplit(".", 1)[0] == module)


def _whole_tensor(
    recipe: Recipe,
    inputs: dict[str, Checkpoint],
    adapters: list[AdapterCheckpoint],
    name: str,
    num_layers: int,
) -> AdapterTensor:
    """A tensor of a module saved whole: ``W0 + sum_i c_i (W_i - W0)``, each ``W_i`` the
    tensor as that adapter makes it, computed when written."""
    base = inputs["base"]
    dtype = base.info(name).torch_dtype

    def load() -> torch.Tensor:
        w0 = base.tensor(name).float()
        merged = w0.clone()
        for c, ckpt in zip(coefficients(recipe, name, num_layers), adapters, strict=True):
            merged += c * (ckpt.tensor(name).float() - w0)
        return merged.to(dtype)

    module, param = name.rsplit(".", 1)
    return AdapterTensor(peft_key(module, param), dtype, tuple(base.info(name).shape), load)


def _svd(
    recipe: Recipe, options: MergeOptions, spec: AdapterOutputSpec, progress: object
) -> tuple[Plan, int]:
    """Any method: the dense merge into a hidden scratch folder beside the output, then its
    update over the base extracted per module at ``rank`` (default 16) or ``energy``; the
    scratch folder is removed whatever happens."""
    dense = recipe.model_copy(update={"output_format": "dense", "adapter_output": None})
    output = output_of(recipe, options)
    plan_recipe(dense, options.model_copy(update={"output": output}))  # inputs and output, first
    fs, path = storage.resolve(output, **recipe.storage_options)
    parent, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
    remove_stale_staging(fs, parent, name, SCRATCH)
    scratch = storage.join(parent, f"{staging_prefix(name, SCRATCH)}{uuid.uuid4().hex[:12]}")
    scratch_uri = storage.full_uri(fs, scratch)
    try:
        at_scratch = options.model_copy(update={"output": scratch_uri, "overwrite": False})
        result = run_merge(dense, at_scratch, progress)
        metadata = {**result.plan.metadata, "recipe_hash": recipe.hash()}
        base = options.read_from.get("base", recipe.base)
        extracted = extract_lora(
            base,
            scratch_uri,
            output,
            rank=spec.rank,
            energy=spec.energy,
            base_name=recipe.base,
            device=options.device,
            threads=options.threads,
            overwrite=options.overwrite,
            metadata=metadata,
            **recipe.storage_options,
        )
    finally:
        remove_folder(fs, scratch)
    summary = extracted.summary()
    log.info(
        "%s: %d modules at rank %s, energy kept min %.4f mean %.4f",
        output,
        summary["modules"],
        "/".join(map(str, summary["ranks"])),
        summary["energy_min"],
        summary["energy_mean"],
    )
    for m in extracted.modules:
        kept = "%s: rank %d keeps %.4f of its merged update's energy"
        log.debug(kept, m.module, m.rank, m.energy)
    return result.plan, result.input_bytes
