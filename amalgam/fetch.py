"""The fetch stage: resolve a recipe's model URIs, hash and size them, verify, optionally stage."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from amalgam import storage
from amalgam.adapters import open_input, split_adapter_uri
from amalgam.checkpoint import open_checkpoint
from amalgam.errors import CheckpointError
from amalgam.recipe import Recipe

COMPLETE = ".complete"  # marks a finished local copy


@dataclass(frozen=True)
class FetchedModel:
    """One input of a recipe as found in storage: where, what (content hash), how big."""

    label: str
    uri: str
    content_hash: str
    nbytes: int
    files: tuple[str, ...]
    kind: str

    def as_dict(self) -> dict:
        return asdict(self)


def recipe_inputs(recipe: Recipe) -> list[tuple[str, str]]:
    """(label, uri) of the base (labelled ``base``) and every model, in recipe order."""
    base = [("base", recipe.base)] if recipe.base else []
    return base + [(m.label, m.uri) for m in recipe.models]


def fetch_model(
    label: str, uri: str, *, allow_pickle: bool = False, **storage_options
) -> FetchedModel:
    """Open ``uri`` lazily (opening checks every file against its header: truncated files and
    trailing bytes are refused), refuse one without tensors, hash its weights. A
    ``BASE+ADAPTER`` reference is hashed as the model it makes (both parts)."""
    opener = open_input if split_adapter_uri(uri, **storage_options)[0] else open_checkpoint
    with opener(uri, allow_pickle=allow_pickle, **storage_options) as ckpt:
        if not ckpt.tensors and all(f.endswith(".safetensors") for f in ckpt.files):
            raise CheckpointError(f"{ckpt.uri}: holds no tensors")
        try:
            digest = ckpt.content_hash()
        except OSError as exc:
            raise CheckpointError(f"{uri}: cannot read weights to hash them ({exc})") from exc
        return FetchedModel(label, uri, digest, ckpt.nbytes, tuple(ckpt.files), ckpt.kind)


def fetch_recipe(recipe: Recipe, *, allow_pickle: bool = False) -> list[FetchedModel]:
    """Fetch every input of ``recipe`` (base first)."""
    return [
        fetch_model(label, uri, allow_pickle=allow_pickle, **recipe.storage_options)
        for label, uri in recipe_inputs(recipe)
    ]


def stage_model(model: FetchedModel, cache_dir: Path, **storage_options) -> str:
    """Copy a fetched model into ``cache_dir/<content hash>`` (once, atomically) and return the
    local URI. The copy is re-hashed and must match the source's content hash."""
    if split_adapter_uri(model.uri, **storage_options)[0]:
        raise CheckpointError(
            f"{model.uri}: --stage copies model folders, not BASE+ADAPTER references: list the "
            "adapter folder as a model over the recipe's base instead"
        )
    target = Path(cache_dir) / model.content_hash.removeprefix("sha256:")[:32]
    with open_checkpoint(model.uri, allow_pickle=True, **storage_options) as ckpt:
        names = [*ckpt.files, *ckpt.side_files()]
        fs, root = ckpt.fs, ckpt.root
    local = str(target / model.files[0]) if model.kind == "file" else str(target)
    if (target / COMPLETE).is_file():
        return local
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in names:
            fs.get_file(storage.join(root, name), str(tmp / name))
        copy = str(tmp / model.files[0]) if model.kind == "file" else str(tmp)
        staged = fetch_model(model.label, copy, allow_pickle=True)
        if staged.content_hash != model.content_hash:
            raise CheckpointError(
                f"{model.uri}: the local copy hashes to {staged.content_hash}, "
                f"the source to {model.content_hash} (changed while copying?)"
            )
        (tmp / COMPLETE).write_text(model.content_hash)
        try:
            tmp.rename(target)
        except OSError:  # another process staged it first: theirs is as good
            if not (target / COMPLETE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return local
