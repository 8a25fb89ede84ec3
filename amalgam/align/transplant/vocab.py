"""The two vocabularies of a transplant: which donor tokens the model has (by their text, and
special tokens by their role), which it lacks, and how its own tokenizer spells the latter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from amalgam import storage
from amalgam.errors import AmalgamError

#: The donor files carried into the output: the fast tokenizer and its settings.
CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ROLES = ("bos", "eos", "unk", "pad")


class TransplantError(AmalgamError):
    """A tokenizer transplant cannot be done (no tokenizer, no shared token, no embeddings)."""


@dataclass(frozen=True)
class Vocabulary:
    """A model folder's tokenizer: token text -> id, special token of each role, its JSON
    files and its config (None when the folder has none)."""

    where: str
    tokenizer: Any  # tokenizers.Tokenizer
    ids: dict[str, int]
    roles: dict[str, str]
    files: dict[str, Any]
    config: dict[str, Any] | None


def read_json(fs: Any, path: str, where: str) -> Any:
    try:
        with fs.open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TransplantError(f"{where}: not valid JSON ({exc})") from None


def _content(value: Any) -> str | None:
    """The token text of a ``*_token`` setting (a string, or an AddedToken's dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_vocabulary(fs: Any, root: str, where: str) -> Vocabulary:
    """The tokenizer of the model folder ``root``; ``where`` names it in errors."""
    from tokenizers import Tokenizer  # lazy: tokenizers, only a transplant reads tokenizers

    path = storage.join(root, "tokenizer.json")
    if not fs.exists(path):
        raise TransplantError(
            f"{where}/tokenizer.json: no such file; a transplant matches tokens by their text "
            "and needs each model's fast tokenizer (tokenizer.json)"
        )
    files = {
        name: read_json(fs, storage.join(root, name), f"{where}/{name}")
        for name in (*CARRIED, "config.json")
        if fs.exists(storage.join(root, name))
    }
    try:
        tokenizer = Tokenizer.from_str(json.dumps(files["tokenizer.json"]))
    except Exception as exc:  # the tokenizers library raises plain Exceptions on bad files
        raise TransplantError(f"{where}/tokenizer.json: not a tokenizer ({exc})") from None
    jinja = storage.join(root, "chat_template.jinja")
    if fs.exists(jinja):  # carried inside tokenizer_config.json, where transformers reads it
        with fs.open(jinja, "r", encoding="utf-8") as fh:
            files.setdefault("tokenizer_config.json", {})["chat_template"] = fh.read()
    settings = {
        **files.get("special_tokens_map.json", {}),
        **files.get("tokenizer_config.json", {}),
    }
    ids = tokenizer.get_vocab(with_added_tokens=True)
    roles = {
        role: token
        for role in ROLES
        if (token := _content(settings.get(f"{role}_token"))) is not None and token in ids
    }
    return Vocabulary(where, tokenizer, ids, roles, files, files.pop("config.json", None))


@dataclass(frozen=True)
class TokenMatch:
    """Donor ids with the model id of the same token (``shared``, by donor id), and the
    donor ids of tokens the model lacks (``new``)."""

    shared: list[tuple[int, int]]
    new: list[int]


def match_tokens(model: Vocabulary, donor: Vocabulary, model_rows: int) -> TokenMatch:
    """Pair each donor token with the model's token of the same text, or of the same special
    role (so ``</s>`` and ``<|endoftext|>`` both ending text match); model ids past its
    embedding table count as missing."""
    by_role = {donor.roles[r]: model.ids[model.roles[r]] for r in donor.roles if r in model.roles}
    shared, new = [], []
    for token, donor_id in sorted(donor.ids.items(), key=lambda item: item[1]):
        model_id = by_role.get(token, model.ids.get(token))
        if model_id is not None and model_id < model_rows:
            shared.append((donor_id, model_id))
        else:
            new.append(donor_id)
    return TokenMatch(shared, new)


def model_pieces(
    model: Vocabulary, donor: Vocabulary, donor_ids: list[int], model_rows: int
) -> list[list[int]]:
    """Per donor id: the model ids its own tokenizer gives the token's text (unknown pieces
    and ids past the model's table left out)."""
    unknown = model.ids.get(model.roles.get("unk", ""))
    pieces = []
    for donor_id in donor_ids:
        text = donor.tokenizer.decode([donor_id], skip_special_tokens=False)
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        pieces.append([i for i in ids if i != unknown and i < model_rows])
    return pieces
