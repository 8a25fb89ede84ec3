"""``align.method: vocab``: every input rewritten into the output vocabulary (aligned copies
with the output tokenizer and an ownership sidecar), or passed on where nothing changes."""

from __future__ import annotations

from typing import Any

import torch

from amalgam import storage
from amalgam.adapters import open_input
from amalgam.align.copies import aligned_copy_done, write_aligned_copy
from amalgam.align.vocab.ownership import ROWS_FILE, ownership_of
from amalgam.align.vocab.remap import donor_rows, remap_rows, row_map, vocab_tensors
from amalgam.align.vocab.tokenizers import (
    SPECIAL,
    TOKENIZER_FILES,
    OutputTokenizer,
    load_tokenizer,
    output_tokenizer,
    vocabulary,
)
from amalgam.checkpoint import Checkpoint
from amalgam.recipe import AlignSpec, TokenizerSpec


def align_vocab(
    spec: AlignSpec, inputs: dict[str, str], workdir: str, **storage_options: Any
) -> dict[str, str]:
    """What the merge reads for each input label: its aligned copy under ``workdir`` (reused
    when complete), or the input itself when its rows and the tokenizer need no change."""
    tspec = spec.tokenizer or TokenizerSpec()
    ckpts: dict[str, Checkpoint] = {}
    try:
        for label, uri in inputs.items():
            ckpts[label] = open_input(uri, **storage_options)
        toks = {label: load_tokenizer(label, c) for label, c in ckpts.items()}
        out = output_tokenizer(tspec, toks)
        vocabs = {label: vocabulary(t) for label, t in toks.items()}
        maps = {label: row_map(vocabs[label], out.vocab) for label in ckpts}
        tables = {label: vocab_tensors(label, c, len(vocabs[label])) for label, c in ckpts.items()}
        identity = torch.arange(len(out.vocab))
        base = "base" if "base" in inputs else None
        uris: dict[str, str] = {}
        donors: dict[str, torch.Tensor] = {}
        missing = torch.zeros(len(out.vocab), dtype=torch.bool)
        for index in maps.values():
            missing |= index < 0
        rows = torch.nonzero(missing).flatten()
        for label, ckpt in ckpts.items():
            index, names = maps[label], tables[label]
            same = torch.equal(index, identity)
            if not out.changed and same and all(ckpt.shape(n)[0] == len(index) for n in names):
                uris[label] = inputs[label]
                continue
            uri = storage.join(workdir, label)
            if not aligned_copy_done(uri, **storage_options):
                for name in names:
                    if tspec.init == "auto" and name not in donors and bool((index < 0).any()):
                        donors[name] = donor_rows(name, rows, maps, ckpts, base)
                _write(ckpt, uri, out, index, names, tspec.init, donors, rows, storage_options)
            uris[label] = uri
        return uris
    finally:
        for c in ckpts.values():
            c.close()


def _write(
    ckpt: Checkpoint,
    uri: str,
    out: OutputTokenizer,
    index: torch.Tensor,
    names: list[str],
    init: str,
    donors: dict[str, torch.Tensor],
    rows: torch.Tensor,
    storage_options: dict[str, Any],
) -> None:
    """One input's aligned copy: vocabulary tensors remapped, the output tokenizer, config.json
    sized to it, and which rows the model owns."""
    lacking = index[rows] < 0  # the model's missing rows among the rows some input lacks
    targets = set(names)

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in targets:
            return tensor
        donor = donors.get(name)
        return remap_rows(tensor, index, init, None if donor is None else donor[lacking])

    files = out.files()
    config = dict(ckpt.config or {})
    config["vocab_size"] = len(out.vocab)
    for attr in SPECIAL:
        token = getattr(out.tokenizer, attr)
        if f"{attr}_id" in config and token is not None:
            config[f"{attr}_id"] = out.vocab[token]
    owned = ownership_of(index >= 0, names)
    write_aligned_copy(
        ckpt,
        uri,
        transform,
        shapes={n: (len(index), *ckpt.shape(n)[1:]) for n in names},
        side_json={**files, "config.json": config, ROWS_FILE: owned.as_json()},
        skip_side=tuple(f for f in TOKENIZER_FILES if f not in files),
        **storage_options,
    )
