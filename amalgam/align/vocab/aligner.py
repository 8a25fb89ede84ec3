"""``align.method: vocab``: every input rewritten into the output vocabulary (aligned copies
with the output tokenizer and an ownership sidecar), or passed on where nothing changes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from amalgam import storage
from amalgam.adapters import open_input
from amalgam.align.copies import aligned_copy_done, write_aligned_copy
from amalgam.align.vocab.ownership import ROWS_FILE, ownership_of
from amalgam.align.vocab.remap import donor_rows, pad_rows, remap_rows, row_map, vocab_tensors
from amalgam.align.vocab.tokenizers import (
    SPECIAL,
    OutputTokenizer,
    VocabError,
    chosen,
    load_tokenizer,
    output_tokenizer,
    vocabulary,
)
from amalgam.checkpoint import TOKENIZER_FILES, Checkpoint
from amalgam.recipe import AlignSpec, TokenizerSpec


def align_vocab(
    spec: AlignSpec, inputs: dict[str, str], workdir: str, **storage_options: Any
) -> dict[str, str]:
    """What the merge reads for each input label: its aligned copy under ``workdir`` (reused
    when complete and made from the same tokenizers), or the input itself when its rows and
    the tokenizer need no change."""
    ckpts: dict[str, Checkpoint] = {}
    try:
        for label, uri in inputs.items():
            ckpts[label] = open_input(uri, **storage_options)
        remap = VocabRemap.of(spec.tokenizer or TokenizerSpec(), ckpts)
        uris = {}
        for label in ckpts:
            if not remap.changes(label):
                uris[label] = inputs[label]
                continue
            uris[label] = storage.join(workdir, label)
            side = remap.side_json(label)
            if not _current(uris[label], side, storage_options):
                remap.write(label, uris[label], side, storage_options)
        return uris
    finally:
        for c in ckpts.values():
            c.close()


@dataclass
class VocabRemap:
    """The output tokenizer and, per input, its row map (output id -> its id, or -1) and its
    vocabulary tensors."""

    init: str
    ckpts: dict[str, Checkpoint]
    out: OutputTokenizer
    maps: dict[str, torch.Tensor]
    tables: dict[str, list[str]]
    digest: str  # of every input's vocabulary: a reused copy must come from the same ones
    rows: int  # output rows: the vocabulary and its padding
    tokens: dict[str, int]  # each input's vocabulary size (its rows past it are padding)
    # align.tokenizer.tokens: output id -> (the input whose row it takes, None: zeros; force)
    configured: dict[int, tuple[str | None, bool]] = field(default_factory=dict)
    donors: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: TokenizerSpec, ckpts: dict[str, Checkpoint]) -> VocabRemap:
        toks = {label: load_tokenizer(label, c) for label, c in ckpts.items()}
        out = output_tokenizer(spec, toks)
        vocabs = {label: vocabulary(t) for label, t in toks.items()}
        maps = {label: row_map(vocabs[label], out.vocab) for label in ckpts}
        tables = {label: vocab_tensors(label, c, len(vocabs[label])) for label, c in ckpts.items()}
        blob = json.dumps(vocabs, sort_keys=True, ensure_ascii=False).encode()
        digest = hashlib.sha256(blob).hexdigest()
        configured = _configured(spec, out.vocab, maps)
        # padding: the reference's rows past the vocabulary, or up to the multiple asked for
        first = next(iter(ckpts))
        multiple = spec.pad_to_multiple_of or 1
        kept = (
            0 if spec.pad_to_multiple_of else max(ckpts[first].shape(n)[0] for n in tables[first])
        )
        rows = max(-(-len(out.vocab) // multiple) * multiple, kept)
        tokens = {label: len(v) for label, v in vocabs.items()}
        return cls(spec.init, ckpts, out, maps, tables, digest, rows, tokens, configured)

    @property
    def base(self) -> str | None:
        return "base" if "base" in self.ckpts else None

    @property
    def lacking(self) -> torch.Tensor:
        """Output rows some input lacks (the rows a fill may be needed for)."""
        missing = torch.stack([index < 0 for index in self.maps.values()]).any(0)
        return torch.nonzero(missing).flatten()

    def changes(self, label: str) -> bool:
        """Whether the input needs an aligned copy: new tokenizer, or rows that move."""
        index, ckpt = self.maps[label], self.ckpts[label]
        same = torch.equal(index, torch.arange(len(index)))
        rows = all(ckpt.shape(n)[0] == self.rows for n in self.tables[label])
        return self.out.changed or bool(self.configured) or not (same and rows)

    def owned(self, label: str) -> torch.Tensor:
        """The output rows ``label`` owns: its tokens' rows; a forced token's row only for the
        input it comes from (every input for zeros); every padding row."""
        padding = torch.ones(self.rows - len(self.out.vocab), dtype=torch.bool)
        mask = torch.cat([self.maps[label] >= 0, padding])
        for row, (source, force) in self.configured.items():
            if force:
                mask[row] = source is None or source == label
        return mask

    def token_rows(self, name: str) -> dict[int, torch.Tensor]:
        """Output id -> the configured row of tensor ``name`` (each source read once)."""
        rows: dict[int, torch.Tensor] = {}
        for source in {s for s, _ in self.configured.values() if s is not None}:
            ckpt = self.ckpts[source]
            if name not in ckpt.tensors:
                raise VocabError(f"align.tokenizer.tokens: '{source}' has no tensor '{name}'")
            tensor = ckpt.tensor(name)
            for row, (s, _) in self.configured.items():
                if s == source:
                    rows[row] = tensor[self.maps[source][row]].clone()
            del tensor
        return rows

    def side_json(self, label: str) -> dict[str, Any]:
        """The copy's JSON files: output tokenizer, config.json sized to it, ownership."""
        config = dict(self.ckpts[label].config or {})
        config["vocab_size"] = self.rows
        for attr in SPECIAL:
            token = getattr(self.out.tokenizer, attr)
            if f"{attr}_id" in config and token is not None:
                config[f"{attr}_id"] = self.out.vocab[token]
        owned = ownership_of(self.owned(label), self.tables[label]).as_json()
        rows = {**owned, "vocabularies": self.digest}
        return {**self.out.files, "config.json": config, ROWS_FILE: rows}

    def write(
        self, label: str, uri: str, side: dict[str, Any], storage_options: dict[str, Any]
    ) -> None:
        """The aligned copy of ``label``: vocabulary tensors remapped, the rest passed on."""
        ckpt, index, names = self.ckpts[label], self.maps[label], set(self.tables[label])
        lacking = self.lacking
        mine = index[lacking] < 0  # this input's missing rows among the rows some input lacks
        if self.init == "auto" and bool(mine.any()):
            for name in names - set(self.donors):
                self.donors[name] = donor_rows(name, lacking, self.maps, self.ckpts, self.base)

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if name not in names:
                return tensor
            donor = self.donors.get(name)
            out = remap_rows(tensor, index, self.init, None if donor is None else donor[mine])
            if self.configured:
                values = self.token_rows(name)
                for row, (_, force) in self.configured.items():
                    if force or index[row] < 0:
                        out[row] = values.get(row, 0)
            return pad_rows(out, tensor, index, self.tokens[label], self.rows)

        write_aligned_copy(
            ckpt,
            uri,
            transform,
            shapes={n: (self.rows, *ckpt.shape(n)[1:]) for n in names},
            side_json=side,
            skip_side=tuple(f for f in TOKENIZER_FILES if f not in side),
            also_read=self.ckpts.values(),  # donor and configured rows come from the others
            **storage_options,
        )


def _current(uri: str, side: dict[str, Any], storage_options: dict[str, Any]) -> bool:
    """Whether ``uri`` holds a complete copy with exactly these JSON files."""
    if not aligned_copy_done(uri, **storage_options):
        return False
    fs, path = storage.resolve(uri, **storage_options)
    for name, obj in side.items():
        file = storage.join(path, name)
        if not fs.exists(file):
            return False
        with fs.open(file, "rb") as fh:
            if json.loads(fh.read()) != obj:
                return False
    return True


def _configured(
    spec: TokenizerSpec, vocab: dict[str, int], maps: dict[str, torch.Tensor]
) -> dict[int, tuple[str | None, bool]]:
    """``spec.tokens`` by output id, each source resolved to an input that has the token."""
    labels = list(maps)
    out: dict[int, tuple[str | None, bool]] = {}
    for token, row_spec in spec.tokens.items():
        row, source = vocab[token], None
        if row_spec.source != "zero":
            field = f"align.tokenizer.tokens.{token}.source"
            source = chosen(row_spec.source, labels, field)
            if maps[source][row] < 0:
                raise VocabError(f"{field}: '{source}' has no token {token!r}")
        out[row] = (source, row_spec.force)
    return out
