"""``align.method: pleas`` in the pipeline: the PLeaS merge handed on as two aligned copies.

Activation matching (``align_activation_matching``, with ``align.permutation``'s settings)
first permutes B onto A; PLeaS then matches B's MLP units again (partially, with its
budget) and fits the layers. The merge stage averages what align hands on (the recipe must
be ``method: linear`` over the two models with equal weights: ``recipe.pleas_problems``).
Each copy is its model in the merged layout plus one shared correction,
``copy_i = widened_i + (W_pleas - mean_j widened_j)``, so their average is the PLeaS
solution (exactly in float32; to the inputs' dtype rounding otherwise) while each copy still
differs from the other as the models do. With a ``budget``, the copies' MLPs are wider and
their ``config.json`` says so. ``pleas.json`` beside the tensors records the matching.
Models are loaded whole (small models; local folders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from amalgam import storage
from amalgam.align.copies import aligned_copy_done, write_aligned_copy
from amalgam.checkpoint import open_checkpoint
from amalgam.errors import AmalgamError
from amalgam.recipe import PermutationSpec, PleasSpec

if TYPE_CHECKING:
    from amalgam.align.permutation.pleas import Matching
    from amalgam.recipe import AlignSpec


class PleasError(AmalgamError):
    """The inputs or the data of a PLeaS alignment are not usable."""


def matching_record(matching: Matching, spec: dict[str, Any]) -> dict[str, Any]:
    """``pleas.json``: the settings and, per layer, B's unit for each of A's, the unmerged
    slots and the mean correlation of the merged pairs."""
    return {
        **spec,
        "extra_units": matching.extra,
        "layers": [
            {
                "perm": perm.tolist(),
                "unmerged": unmerged.tolist(),
                "mean_correlation": float(corr.mean()),
            }
            for perm, unmerged, corr in zip(
                matching.perm, matching.unmerged, matching.correlation, strict=True
            )
        ],
    }


def align_pleas(
    spec: AlignSpec, inputs: dict[str, str], workdir: str, **storage_options: Any
) -> dict[str, str]:
    """The aligner of ``align.method: pleas`` (``run_align``): two copies under ``workdir``
    whose average is the PLeaS merge of the two inputs; reused when already there."""
    # lazy: torch, transformers and scipy load only when this method runs
    from amalgam.align.permutation.activation_matching import read_texts
    from amalgam.align.permutation.aligner import align_activation_matching
    from amalgam.align.permutation.pleas import pleas_merge, token_batches
    from amalgam.device import load_causal_lm

    if len(inputs) != 2:
        raise PleasError(f"align.method pleas merges two models, not {len(inputs)}")
    permutation = spec.permutation or PermutationSpec()
    texts = read_texts(permutation.data, permutation.samples)  # no data: fails before work
    settings = spec.pleas or PleasSpec()
    outputs = {label: storage.join(workdir, label) for label in inputs}
    if all(aligned_copy_done(uri, **storage_options) for uri in outputs.values()):
        return outputs
    matched = align_activation_matching(
        spec, inputs, storage.join(workdir, "matched"), **storage_options
    )
    folders = []
    for label, uri in matched.items():
        fs, path = storage.resolve(uri, **storage_options)
        if not storage.is_local(fs):
            raise PleasError(f"{label}: {uri}: pleas loads models with transformers (local only)")
        folders.append(path)
    (model_a, tokenizer), (model_b, _) = (load_causal_lm(path, "cpu") for path in folders)
    batches = token_batches(tokenizer, texts, max_length=permutation.max_length)
    merged, widened, matching = pleas_merge(
        model_a, model_b, batches, budget=settings.budget, ridge=settings.ridge
    )
    config = model_a.config.to_dict()
    config["intermediate_size"] = model_a.config.intermediate_size + matching.extra
    record = matching_record(matching, settings.model_dump(mode="json"))
    for (label, uri), own in zip(matched.items(), widened, strict=True):
        copy = {k: own[k] + (merged[k] - (widened[0][k] + widened[1][k]) / 2) for k in merged}
        src = open_checkpoint(uri, **storage_options)
        try:
            write_aligned_copy(
                src,
                outputs[label],
                lambda name, tensor, copy=copy: copy[name].to(tensor.dtype),
                shapes={name: tuple(copy[name].shape) for name in src.names()},
                side_json={"config.json": config, "pleas.json": record},
                **storage_options,
            )
        finally:
            src.close()
    return outputs
