"""Input tokenizers in, the output tokenizer out: union, base or one model's vocabulary, with
the special tokens and chat template the recipe names."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam import storage
from amalgam.checkpoint import TOKENIZER_FILES, Checkpoint
from amalgam.errors import AmalgamError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from amalgam.recipe import TokenizerSpec

#: an input needs one of these among its tokenizer files
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class VocabError(AmalgamError):
    """The inputs' tokenizers cannot be brought into one vocabulary as the recipe asks."""


@dataclass
class OutputTokenizer:
    """The merged model's tokenizer and its vocabulary (token -> id, ids 0..n-1)."""

    tokenizer: PreTrainedTokenizerBase
    vocab: dict[str, int]
    changed: bool  # differs from the reference input's tokenizer

    @cached_property
    def files(self) -> dict[str, Any]:
        """Its files as JSON objects (the chat template inside tokenizer_config.json)."""
        with tempfile.TemporaryDirectory(prefix="amalgam-tokenizer-") as tmp:
            self.tokenizer.save_pretrained(tmp)
            out = {
                p.name: json.loads(p.read_text(encoding="utf-8"))
                for p in Path(tmp).iterdir()
                if p.suffix == ".json"
            }
            template = Path(tmp, "chat_template.jinja")
            if template.exists():
                out["tokenizer_config.json"]["chat_template"] = template.read_text(encoding="utf-8")
        return out


def load_tokenizer(label: str, ckpt: Checkpoint) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to ``ckpt``'s weights (any store: its files are copied to a
    temporary folder first)."""
    # lazy: transformers loads in seconds; only this aligner needs it
    from transformers import AutoTokenizer

    present = (
        []
        if ckpt.kind == "file"
        else [f for f in TOKENIZER_FILES if ckpt.fs.exists(storage.join(ckpt.root, f))]
    )
    if not any(f in VOCAB_FILES for f in present):
        raise VocabError(
            f"model '{label}' ({ckpt.uri}): no tokenizer files ({', '.join(VOCAB_FILES)}); "
            "align.method: vocab needs every input's tokenizer"
        )
    with tempfile.TemporaryDirectory(prefix="amalgam-tokenizer-") as tmp:
        for name in present:
            ckpt.fs.get(storage.join(ckpt.root, name), str(Path(tmp, name)))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError) as exc:
            raise VocabError(
                f"model '{label}' ({ckpt.uri}): cannot load its tokenizer: {exc}"
            ) from exc


def vocabulary(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    """Token -> id, added tokens included."""
    return dict(tok.get_vocab())


def chosen(choice: str, labels: list[str], field: str) -> str:
    """The input label ``choice`` (``base`` or ``model:<label>``) names; ``base`` is the
    reference (the base, else the first model)."""
    if choice == "base":
        return labels[0]
    label = choice.removeprefix("model:")
    if label not in labels:
        raise VocabError(f"{field}: {choice!r} names no input (inputs: {', '.join(labels)})")
    return label


def output_tokenizer(
    spec: TokenizerSpec, toks: dict[str, PreTrainedTokenizerBase]
) -> OutputTokenizer:
    """The merged model's tokenizer by ``spec`` over the inputs' tokenizers (reference first)."""
    labels = list(toks)
    vocabs = {label: vocabulary(t) for label, t in toks.items()}
    special_from = chosen(spec.special_tokens, labels, "align.tokenizer.special_tokens")
    if spec.source == "union":
        out = _union(toks, vocabs)
        changed = len(out) != len(toks[labels[0]])
    else:
        source = chosen(spec.source, labels, "align.tokenizer.source")
        if not spec.allow_remap:
            _same_ids(source, vocabs)
        out, changed = _copy(toks[source]), source != labels[0]
    absent = [t for t in spec.tokens if t not in vocabulary(out)]
    if absent:  # a token the recipe configures and no input has
        _add(out, absent, set())
        changed = True
    vocab = vocabulary(out)
    for attr in SPECIAL:
        token = getattr(toks[special_from], attr)
        if token is None or token == getattr(out, attr):
            continue
        if token not in vocab:
            raise VocabError(
                f"align.tokenizer.special_tokens: {attr} {token!r} of '{special_from}' is not in "
                "the output vocabulary"
            )
        setattr(out, attr, token)
        changed = True
    template = _template(spec.chat_template, toks, special_from, labels)
    if template != out.chat_template:
        out.chat_template = template
        changed = True
    return OutputTokenizer(out, vocab, changed)


def _copy(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    with tempfile.TemporaryDirectory(prefix="amalgam-tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        # lazy: as in load_tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tmp)


def _union(
    toks: dict[str, PreTrainedTokenizerBase], vocabs: dict[str, dict[str, int]]
) -> PreTrainedTokenizerBase:
    """The reference's tokenizer plus, in input order, each input's tokens it lacks (in that
    input's id order), added as tokens of their own (special where they are special)."""
    labels = list(toks)
    out = _copy(toks[labels[0]])
    ref = vocabs[labels[0]]
    if sorted(ref.values()) != list(range(len(ref))):
        raise VocabError(f"model '{labels[0]}': its tokenizer's ids are not 0..{len(ref) - 1}")
    order = sorted(ref, key=ref.__getitem__)
    seen = set(ref)
    for label in labels[1:]:
        special = set(toks[label].all_special_tokens)
        new = [t for t in sorted(vocabs[label], key=vocabs[label].__getitem__) if t not in seen]
        seen.update(new)
        order += new
        _add(out, new, special)
    vocab = vocabulary(out)
    if [vocab.get(t) for t in order] != list(range(len(order))) or len(vocab) != len(order):
        raise VocabError("the union tokenizer did not give the new tokens the ids in order")
    return out


def _add(tok: PreTrainedTokenizerBase, tokens: list[str], special: set[str]) -> None:
    """Append ``tokens`` to ``tok`` as tokens of their own, in order."""
    # lazy: tokenizers comes with transformers, as in load_tokenizer
    from tokenizers import AddedToken

    if tokens:
        tok.add_tokens([AddedToken(t, normalized=False, special=t in special) for t in tokens])


def _same_ids(source: str, vocabs: dict[str, dict[str, int]]) -> None:
    """Every token the ``source`` tokenizer shares with another input has the same id there."""
    ref = vocabs[source]
    for label, vocab in vocabs.items():
        for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if token in ref and ref[token] != i:
                raise VocabError(
                    f"token {token!r} has id {i} in '{label}' but {ref[token]} in '{source}' "
                    "(align.tokenizer.source); set align.tokenizer.allow_remap: true to remap it"
                )


def _template(
    choice: str | None,
    toks: dict[str, PreTrainedTokenizerBase],
    special_from: str,
    labels: list[str],
) -> str | None:
    if choice is None:
        return toks[special_from].chat_template
    if choice == "base" or choice.startswith("model:"):
        return toks[chosen(choice, labels, "align.tokenizer.chat_template")].chat_template
    return choice
