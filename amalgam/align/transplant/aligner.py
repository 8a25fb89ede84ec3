"""``align.method: transplant``: every input but the donor gets the donor's tokenizer (see
:func:`amalgam.align.transplant.surgery.transplant`), so models with unrelated tokenizers merge
row for row."""

from __future__ import annotations

from typing import Any

from amalgam import storage
from amalgam.align.copies import aligned_copy_done
from amalgam.align.transplant.surgery import transplant
from amalgam.align.transplant.vocab import TransplantError
from amalgam.recipe import AlignSpec, TransplantSpec


def align_transplant(
    spec: AlignSpec, inputs: dict[str, str], workdir: str, **storage_options: Any
) -> dict[str, str]:
    """Labelled URIs to merge: the donor as it is, every other input transplanted into
    ``workdir/models/<label>`` (a complete copy from an earlier run is reused)."""
    settings = spec.transplant or TransplantSpec()
    donor = settings.donor or next(iter(inputs))
    if donor not in inputs:
        raise TransplantError(
            f"align.transplant.donor: {donor!r} is not an input; the inputs are {', '.join(inputs)}"
        )
    out = {donor: inputs[donor]}
    for label, uri in inputs.items():
        if label == donor:
            continue
        copy = storage.join(workdir, "models", label)
        if not aligned_copy_done(copy, **storage_options):
            transplant(
                uri,
                inputs[donor],
                copy,
                method=settings.method,
                k=settings.k,
                overwrite=True,
                **storage_options,
            )
        out[label] = copy
    return {label: out[label] for label in inputs}
