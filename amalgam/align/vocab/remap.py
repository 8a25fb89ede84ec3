"""Vocabulary rows of one model remapped into the output vocabulary: which tensors hold them,
each output row's source row, and the fill of the rows the model lacks."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from amalgam.align.vocab.tokenizers import VocabError
from amalgam.checkpoint import Checkpoint

#: tensors whose rows are the vocabulary: input embeddings and output heads of the usual layouts
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in|lm_head|embed_out)\.weight$"
)


def vocab_tensors(label: str, ckpt: Checkpoint, tokens: int) -> list[str]:
    """``ckpt``'s embedding and LM-head tensors (rows: at least its ``tokens`` tokens; rows
    past them are padding, which the remap drops)."""
    names = [n for n in ckpt.names() if VOCAB_TENSOR.search(n) and len(ckpt.shape(n)) == 2]
    if not names:
        raise VocabError(
            f"model '{label}' ({ckpt.uri}): no embedding tensor ({VOCAB_TENSOR.pattern})"
        )
    for name in names:
        rows = ckpt.shape(name)[0]
        if rows < tokens:
            raise VocabError(
                f"model '{label}': tensor '{name}' has {rows} rows, its tokenizer {tokens} tokens"
            )
    return names


def row_map(vocab: Mapping[str, int], out: Mapping[str, int]) -> torch.Tensor:
    """For each output id, the model's id of that token, or -1 where the model lacks it."""
    index = torch.full((len(out),), -1, dtype=torch.long)
    for token, i in out.items():
        index[i] = vocab.get(token, -1)
    return index


def donor_rows(
    name: str,
    rows: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    ckpts: Mapping[str, Checkpoint],
    base: str | None,
) -> torch.Tensor:
    """Fill for the output ``rows`` of tensor ``name`` (float32): the base's row where the base
    has the token, else the mean of the rows of the inputs that have it, else zeros. Reads each
    input's tensor once, one at a time."""
    holders = [label for label, c in ckpts.items() if name in c.tensors]
    width = ckpts[holders[0]].shape(name)[1:]
    total = torch.zeros((len(rows), *width))
    count = torch.zeros(len(rows))
    base_rows = None
    for label in holders:
        if ckpts[label].shape(name)[1:] != width:
            raise VocabError(
                f"tensor '{name}': rows of {tuple(width)} in '{holders[0]}' but "
                f"{ckpts[label].shape(name)[1:]} in '{label}'"
            )
        src = maps[label][rows]
        have = src >= 0
        if not bool(have.any()):
            continue
        picked = ckpts[label].tensor(name)[src[have]].float()
        total[have] += picked
        count[have] += 1
        if label == base:
            base_rows = (have, picked)
    fill = total / count.clamp(min=1).unsqueeze(-1)
    if base_rows is not None:
        fill[base_rows[0]] = base_rows[1]
    return fill


def remap_rows(
    tensor: torch.Tensor, index: torch.Tensor, init: str, donor: torch.Tensor | None
) -> torch.Tensor:
    """``tensor``'s rows in output order (``index``: :func:`row_map`); rows the model lacks
    take ``donor`` (``init: auto``, rows in output order of the missing ones), the mean of the
    model's own rows (``mean``) or zeros (``zero``)."""
    have = index >= 0
    out = tensor.index_select(0, index.clamp(min=0))  # the one copy: rows in output order
    missing = ~have
    if not bool(missing.any()):
        return out
    out[missing] = 0
    if init == "zero":
        return out
    if init == "mean":
        out[missing] = tensor[index[have]].float().mean(0).to(tensor.dtype)
    elif donor is not None:
        out[missing] = donor.to(tensor.dtype)
    return out


def pad_rows(
    out: torch.Tensor, tensor: torch.Tensor, index: torch.Tensor, tokens: int, rows: int
) -> torch.Tensor:
    """``out`` (one row per output token) padded to ``rows``: row ``r`` is the model's own
    padding row where it has one (``r`` past its ``tokens`` tokens, inside ``tensor``), else the
    mean of its token rows."""
    n = out.shape[0]
    if rows <= n:
        return out
    mean = tensor[index[index >= 0]].float().mean(0).to(tensor.dtype)
    pad = mean.expand(rows - n, *mean.shape).clone()
    start, stop = max(n, tokens), min(rows, tensor.shape[0])
    if start < stop:
        pad[start - n : stop - n] = tensor[start:stop]
    return torch.cat([out, pad])
