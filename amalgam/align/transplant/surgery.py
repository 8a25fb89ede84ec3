"""``transplant``: a model rewritten for a donor's tokenizer, streamed tensor by tensor.

Only the vocabulary tables (input embeddings, and the LM head when it is not tied) are held
in memory; every other tensor passes through :func:`amalgam.align.copies.write_aligned_copy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from amalgam import storage
from amalgam.adapters import open_input
from amalgam.align.copies import write_aligned_copy
from amalgam.align.transplant.approximate import least_squares_rows, omp_rows, subword_rows
from amalgam.align.transplant.vocab import (
    CARRIED,
    ROLES,
    TokenMatch,
    TransplantError,
    Vocabulary,
    match_tokens,
    model_pieces,
    read_json,
    read_vocabulary,
)
from amalgam.checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint
from amalgam.engine.inputs import check_output
from amalgam.errors import CheckpointError

Method = Literal["omp", "least_squares", "subword"]
METHODS: tuple[str, ...] = ("omp", "least_squares", "subword")
#: Module names of the input embeddings and of the output head (Hugging Face conventions).
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "embed_in", "word_embeddings")
HEADS = ("lm_head", "embed_out")


@dataclass(frozen=True)
class Transplanted:
    """What a transplant wrote: the output, its vocabulary rows, and how each was made."""

    output: str
    method: str
    rows: int
    copied: int
    approximated: int
    tables: tuple[str, ...]


def vocab_tensor(ckpt: Checkpoint, modules: tuple[str, ...]) -> str | None:
    """The 2-D ``<module>.weight`` tensor of the first of ``modules`` the checkpoint holds."""
    for module in modules:
        for name in ckpt.names():
            parts = name.split(".")
            if parts[-2:] == [module, "weight"] and len(ckpt.shape(name)) == 2:
                return name
    return None


def _donor_tables(donor: Checkpoint) -> tuple[str, str]:
    """(input embedding, output head) tensor names of the donor; a tied donor's head is its
    input embedding."""
    embed = vocab_tensor(donor, INPUT_EMBEDDINGS)
    if embed is None:
        raise TransplantError(
            f"donor {donor.uri}: no input embedding tensor (*.{'/'.join(INPUT_EMBEDDINGS)}"
            ".weight) in its weights; use method subword, which needs only its tokenizer"
        )
    return embed, vocab_tensor(donor, HEADS) or embed


def new_table(
    model_table: torch.Tensor,
    donor_table: torch.Tensor | None,
    match: TokenMatch,
    pieces: list[list[int]],
    rows: int,
    method: str,
    k: int,
) -> torch.Tensor:
    """The model's table in the donor's id order: shared tokens' rows copied, new tokens'
    rows approximated by ``method``, rows past the donor's vocabulary zero (float32)."""
    out = model_table.new_zeros((rows, model_table.shape[1]))
    donor_ids = torch.tensor([d for d, _ in match.shared], dtype=torch.long)
    model_ids = torch.tensor([m for _, m in match.shared], dtype=torch.long)
    out[donor_ids] = model_table[model_ids]
    if not match.new:
        return out
    new = torch.tensor(match.new, dtype=torch.long)
    if method == "subword":
        out[new] = subword_rows(model_table, pieces)
    elif method == "omp":
        out[new] = omp_rows(donor_table[new], donor_table[donor_ids], model_table[model_ids], k)
    else:
        out[new] = least_squares_rows(
            donor_table[new], donor_table[donor_ids], model_table[model_ids]
        )
    return out


def _with_donor_ids(config: dict[str, Any], donor: Vocabulary, rows: int | None) -> dict[str, Any]:
    """``config`` with the donor's special token ids (from its config, else its tokenizer)
    and, when given, ``rows`` as the vocabulary size."""
    out = dict(config)
    if rows is not None:
        out["vocab_size"] = rows
    for role in ROLES:
        key = f"{role}_token_id"
        if donor.config is not None and key in donor.config:
            value = donor.config[key]
        else:
            value = donor.ids.get(donor.roles.get(role, ""))
        if value is not None or key in out:
            out[key] = value
    return out


def _open_donor(donor_uri: str, method: str, storage_options: dict[str, Any]) -> Checkpoint:
    try:
        return open_checkpoint(donor_uri, **storage_options)
    except CheckpointError as exc:
        raise TransplantError(
            f"donor {exc}; method {method} reads the donor's embeddings (method subword needs "
            "only its tokenizer)"
        ) from None


def _embedding(model: Checkpoint) -> str:
    """The name of the model's input embedding tensor."""
    embed = vocab_tensor(model, INPUT_EMBEDDINGS)
    if embed is None:
        raise TransplantError(
            f"model {model.uri}: no input embedding tensor (*.{'/'.join(INPUT_EMBEDDINGS)}.weight)"
        )
    return embed


def _vocab_tables(
    model: Checkpoint,
    embed: str,
    donor: Checkpoint | None,
    vocabularies: tuple[Vocabulary, Vocabulary],
    match: TokenMatch,
    rows: int,
    method: str,
    k: int,
) -> dict[str, torch.Tensor]:
    """The model's rebuilt vocabulary tables (input embeddings ``embed``, and its head when
    untied), by tensor name, in the model's dtype; ``donor`` is None for method subword."""
    model_vocab, donor_vocab = vocabularies
    model_rows = model.shape(embed)[0]
    pieces = model_pieces(model_vocab, donor_vocab, match.new, model_rows) if donor is None else []
    donor_names = _donor_tables(donor) if donor is not None else (None, None)
    top = max(donor_vocab.ids.values()) + 1
    tables = {}
    for name, donor_name in zip((embed, vocab_tensor(model, HEADS)), donor_names, strict=True):
        if name is None:
            continue
        donor_table = None
        if donor is not None and donor_name is not None:
            donor_table = donor.tensor(donor_name).float()
            if donor_table.shape[0] < top:
                raise TransplantError(
                    f"donor {donor.uri}: {donor_name} has {donor_table.shape[0]} rows, fewer "
                    f"than its tokenizer's {top} ids"
                )
        table = new_table(model.tensor(name).float(), donor_table, match, pieces, rows, method, k)
        tables[name] = table.to(model.dtype(name))
    return tables


def _side_json(model: Checkpoint, donor: Vocabulary, rows: int) -> dict[str, Any]:
    """The donor's tokenizer files and the model's configs with the donor's ids and size."""
    side = {name: donor.files[name] for name in CARRIED if name in donor.files}
    side["config.json"] = _with_donor_ids(model.config or {}, donor, rows)
    if "generation_config.json" in model.side_files():
        where = storage.join(model.root, "generation_config.json")
        generation = read_json(model.fs, where, f"model {where}")
        updated = _with_donor_ids(generation, donor, None)
        side["generation_config.json"] = {key: updated[key] for key in generation}
    return side


def transplant(
    model_uri: str,
    donor_uri: str,
    output_uri: str,
    *,
    method: Method = "omp",
    k: int = 8,
    overwrite: bool = False,
    **storage_options: Any,
) -> Transplanted:
    """Write ``model_uri`` with ``donor_uri``'s tokenizer to ``output_uri``: each donor token's
    embedding (and LM-head) row is the model's row of the same token, else approximated by
    ``method`` (``omp`` with ``k`` anchors, ``least_squares``, or ``subword``; see
    :mod:`amalgam.align.transplant.approximate`)."""
    if method not in METHODS:
        raise TransplantError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if k < 1:
        raise TransplantError(f"k: {k} anchors; give at least 1")
    model = open_input(model_uri, **storage_options)
    donor = None
    try:
        donor = _open_donor(donor_uri, method, storage_options) if method != "subword" else None
        model_vocab = read_vocabulary(model.fs, model.root, f"model {model.uri}")
        donor_vocab = read_vocabulary(
            *storage.resolve(donor_uri, **storage_options), f"donor {donor_uri}"
        )
        inputs = {"model": model} | ({"donor": donor} if donor else {})
        check_output(output_uri, inputs, overwrite, storage_options)
        embed = _embedding(model)
        match = match_tokens(model_vocab, donor_vocab, model.shape(embed)[0])
        if not match.shared:
            raise TransplantError(
                f"model {model.uri} and donor {donor_uri} share no token: there is nothing to "
                "copy and nothing to anchor an approximation on"
            )
        rows = max(donor_vocab.ids.values()) + 1
        if donor_vocab.config is not None:
            rows = max(rows, int(donor_vocab.config.get("vocab_size", 0)))
        vocabularies = (model_vocab, donor_vocab)
        tables = _vocab_tables(model, embed, donor, vocabularies, match, rows, method, k)
        write_aligned_copy(
            model,
            output_uri,
            lambda name, tensor: tables.get(name, tensor),
            shapes={name: tuple(t.shape) for name, t in tables.items()},
            side_json=_side_json(model, donor_vocab, rows),
            skip_side=TOKENIZER_FILES,
            **storage_options,
        )
    finally:
        model.close()
        if donor is not None:
            donor.close()
    return Transplanted(output_uri, method, rows, len(match.shared), len(match.new), tuple(tables))
