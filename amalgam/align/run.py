"""The align stage's entry: labelled inputs in, labelled URIs for the merge out.

``check`` passes the inputs on once they are compatible; every other method writes aligned
copies into ``workdir`` (keyed by the stage's content key, so a re-run reuses them) and
returns their URIs for the inputs it changed."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from amalgam.align.compatibility import check_inputs
from amalgam.align.tensor_sets import ExtraTensors

if TYPE_CHECKING:
    from amalgam.recipe import AlignSpec

#: (spec, labelled input URIs (base first), workdir, storage options) -> labelled URIs.
Aligner = Callable[..., dict[str, str]]
#: method -> "module:function" of its aligner, imported on use (torch, scipy).
ALIGNERS: dict[str, str] = {
    "vocab": "amalgam.align.vocab.aligner:align_vocab",
    "transplant": "amalgam.align.transplant.aligner:align_transplant",
    "weight_matching": "amalgam.align.permutation.aligner:align_weight_matching",
    "activation_matching": "amalgam.align.permutation.aligner:align_activation_matching",
    "pleas": "amalgam.align.permutation.pleas_copies:align_pleas",
}


def run_align(
    spec: AlignSpec,
    inputs: Mapping[str, str],
    *,
    workdir: str | None = None,
    extra_tensors: ExtraTensors = "error",
    stepwise: bool = False,
    **storage_options: Any,
) -> dict[str, str]:
    """What the merge should read for each input label, after the recipe's ``align`` section."""
    if spec.method == "check":
        return check_inputs(
            spec, inputs, extra_tensors=extra_tensors, stepwise=stepwise, **storage_options
        )
    module, function = ALIGNERS[spec.method].split(":")
    aligner: Aligner = getattr(importlib.import_module(module), function)
    if workdir is None:
        raise ValueError(f"align method {spec.method} writes aligned copies: give a workdir")
    return aligner(spec, dict(inputs), workdir, **storage_options)
