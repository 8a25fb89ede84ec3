"""The align stage's permutation aligners (``ALIGNERS["weight_matching"]`` and
``["activation_matching"]``): every input is permuted onto the reference
(``align.permutation.reference``, default the first input: the base when there is one).

In ``workdir`` (keyed by the align stage's content key): ``permutations/<label>.safetensors``
(the index tensors; ``.json`` next to it: the spec they belong to), ``models/<label>`` (the
aligned copy), and ``permutations/search.json`` (seconds and passes of each search). A
re-run reuses saved permutations and finished copies. An input whose permutations come out
as the identity is handed on as it is.

API (stable): ``align_by_permutation(spec, inputs, workdir, matcher, **storage_options)`` with
``matcher(perm_spec, ref_ckpt, model_ckpt, permutation) -> (perms, passes)``, for other
permutation-based aligners."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from amalgam import storage
from amalgam.adapters.open import open_input
from amalgam.align.copies import aligned_copy_done
from amalgam.align.permutation.apply import Perms, load_perms, save_perms, write_permuted
from amalgam.align.permutation.matching import is_identity
from amalgam.align.permutation.spec import PermSpec, check_same_architecture, derive_spec
from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError
from amalgam.recipe import AlignSpec, PermutationSpec

log = logging.getLogger(__name__)
Matcher = Callable[[PermSpec, Checkpoint, Checkpoint, PermutationSpec], tuple[Perms, int]]


def align_weight_matching(
    spec: AlignSpec, inputs: dict[str, str], workdir: str, **storage_options: Any
) -> dict[str, str]:
    """``align.method: weight_matching``."""
    # lazy: scipy and the matching code load only when this method runs
    from amalgam.align.permutation.weight_matching import match_weights

    def matcher(
        s: PermSpec, ref: Checkpoint, model: Checkpoint, p: PermutationSpec
    ) -> tuple[Perms, int]:
        return match_weights(s, ref, model, seed=p.seed, max_iter=p.max_iter)

    return align_by_permutation(spec, inputs, workdir, matcher, **storage_options)


def align_activation_matching(
    spec: AlignSpec, inputs: dict[str, str], workdir: str, **storage_options: Any
) -> dict[str, str]:
    """``align.method: activation_matching`` (local model folders: the models are run)."""
    # lazy: transformers and scipy load only when this method runs
    from amalgam.align.permutation.activation_matching import match_activations, read_texts

    permutation = spec.permutation or PermutationSpec()
    read_texts(permutation.data, 1)  # missing data fails before any work

    def matcher(
        s: PermSpec, ref: Checkpoint, model: Checkpoint, p: PermutationSpec
    ) -> tuple[Perms, int]:
        for ckpt in (ref, model):
            if not storage.is_local(ckpt.fs) or ckpt.kind != "model":
                raise PlanError(f"{ckpt.uri}: activation matching runs models from local folders")
        return match_activations(s, ref.root, model.root, p)

    return align_by_permutation(spec, inputs, workdir, matcher, **storage_options)


def align_by_permutation(
    spec: AlignSpec,
    inputs: dict[str, str],
    workdir: str,
    matcher: Matcher,
    **storage_options: Any,
) -> dict[str, str]:
    """label -> the URI the merge reads: the input itself (the reference, or a model already
    in the reference's basis) or its aligned copy under ``workdir``."""
    permutation = spec.permutation or PermutationSpec()
    labels = list(inputs)
    reference = permutation.reference or labels[0]
    if reference not in inputs:
        raise PlanError(
            f"align.permutation.reference: {reference!r} is not an input ({', '.join(labels)})"
        )
    base = inputs.get("base")
    out = {reference: inputs[reference]}
    searches: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        ref = stack.enter_context(open_input(inputs[reference], base=base, **storage_options))
        ref_spec = derive_spec(ref, residual=permutation.residual)
        for label, uri in inputs.items():
            if label == reference:
                continue
            with open_input(uri, base=base, **storage_options) as ckpt:
                check_same_architecture(
                    ref_spec, derive_spec(ckpt, residual=permutation.residual), reference, label
                )
                name = re.sub(r"[^A-Za-z0-9._-]", "_", label)
                perms_uri = storage.join(workdir, "permutations", f"{name}.safetensors")
                perms = load_perms(perms_uri, ref_spec, **storage_options)
                if perms is None:
                    start = time.perf_counter()
                    perms, passes = matcher(ref_spec, ref, ckpt, permutation)
                    seconds = time.perf_counter() - start
                    searches[label] = {"seconds": round(seconds, 3), "passes": passes}
                    log.info("%s: permutation search %.2f s, %d passes", label, seconds, passes)
                    save_perms(perms_uri, ref_spec, perms, **storage_options)
                if is_identity(perms):
                    out[label] = uri
                    continue
                copy = storage.join(workdir, "models", name)
                if not aligned_copy_done(copy, **storage_options):
                    write_permuted(ckpt, copy, ref_spec, perms, **storage_options)
                out[label] = copy
    if searches:
        _record_searches(
            storage.join(workdir, "permutations", "search.json"), searches, storage_options
        )
    return {label: out[label] for label in labels}


def _record_searches(uri: str, searches: dict, storage_options: dict[str, Any]) -> None:
    fs, path = storage.resolve(uri, **storage_options)
    before = json.loads(fs.cat_file(path)) if fs.exists(path) else {}
    with fs.open(path, "w") as fh:
        json.dump({**before, **searches}, fh, indent=1)
