"""Find model checkpoints under a URI prefix (the folders a training job drops experts into)."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from amalgam import storage
from amalgam.checkpoint import INDEX_FILES, SINGLE_FILES, unfinished_commit
from amalgam.fetch import FetchedModel, fetch_model


def discover_checkpoints(prefix: str, **storage_options: Any) -> list[tuple[str, str]]:
    """(name, URI) of every direct subfolder of ``prefix`` that holds safetensors weights (a
    single file, or shards with their index), sorted by name. Folders still being written
    are left out: a hidden name, an index whose shards are not all there yet, and on object
    stores a folder amalgam is committing (its shards, no commit record yet)."""
    fs, root = storage.resolve(prefix, **storage_options)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    found = []
    for entry in fs.ls(root, detail=True):
        name = PurePosixPath(entry["name"].rstrip("/")).name
        if entry["type"] != "directory" or name.startswith((".", "_")):
            continue
        files = {PurePosixPath(p).name for p in fs.ls(entry["name"], detail=False)}
        complete = files & set(SINGLE_FILES) or (
            files & set(INDEX_FILES) and _shards_present(fs, entry["name"], files)
        )
        if complete and not unfinished_commit(fs, entry["name"], files):
            found.append((name, storage.full_uri(fs, entry["name"].rstrip("/"))))
    return sorted(found)


def _shards_present(fs: Any, folder: str, files: set[str]) -> bool:
    index = next(f for f in INDEX_FILES if f in files)
    with fs.open(storage.join(folder, index), "rb") as fh:
        weight_map = json.loads(fh.read()).get("weight_map") or {}
    return bool(weight_map) and set(weight_map.values()) <= files


def discover_models(prefix: str, **storage_options: Any) -> list[FetchedModel]:
    """Every checkpoint under ``prefix`` (see :func:`discover_checkpoints`), verified and
    hashed; one per content (the first by name), in name order."""
    found, seen = [], set()
    for name, uri in discover_checkpoints(prefix, **storage_options):
        model = fetch_model(name, uri, **storage_options)
        if model.content_hash not in seen:
            seen.add(model.content_hash)
            found.append(model)
    return found
