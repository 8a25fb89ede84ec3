"""The zoo's character-level tokenizer, and the check that it survives a save / reload."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from amalgam.errors import AmalgamError
from amalgam.zoo.tasks import VOCABULARY

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


class TokenizerError(AmalgamError):
    """A saved tokenizer does not give the ids the built one gives."""


def build_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """One token per character of `VOCABULARY`, after the special tokens; `max_length` is the
    models' context length.

    No post-processor: encoding never adds BOS/EOS, whatever `add_special_tokens` says, so
    lm-eval (which may or may not ask for special tokens) sees exactly the ids used in
    training."""
    # lazy: tokenizers and transformers, which a cached zoo does not need
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of `text`, one per character, without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_round_trip(built: PreTrainedTokenizerFast, saved_dir: Path, texts: Iterable[str]) -> None:
    """Reload `saved_dir` with AutoTokenizer and raise unless it encodes every text (with and
    without special tokens) to the ids `built` gives."""
    from transformers import AutoTokenizer  # lazy: transformers, as above

    reloaded = AutoTokenizer.from_pretrained(saved_dir)
    for text in texts:
        expected = encode(built, text)
        if len(expected) != len(text) or built.unk_token_id in expected:
            raise TokenizerError(f"{saved_dir}: {text!r} is not one known token per character")
        for special in (False, True):
            got = reloaded(text, add_special_tokens=special)["input_ids"]
            if got != expected:
                raise TokenizerError(
                    f"{saved_dir}: reloaded tokenizer encodes {text!r} as {got}, "
                    f"built one as {expected} (add_special_tokens={special})"
                )
