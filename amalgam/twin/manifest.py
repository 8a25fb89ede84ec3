"""A Twin-Merging folder's manifest (``twin.json``) and file names."""

from __future__ import annotations

import json
from typing import Any

from amalgam import storage
from amalgam.twin.errors import TwinError

MANIFEST = "twin.json"
ROUTER = "router.safetensors"
FORMAT = 1


def read_twin_manifest(uri: str, **storage_options: Any) -> dict[str, Any]:
    """The ``twin.json`` of a Twin folder, checked for its format."""
    fs, path = storage.resolve(uri, **storage_options)
    file = storage.join(path, MANIFEST)
    if not fs.exists(file):
        raise TwinError(f"{uri}: no {MANIFEST}, so not a Twin-Merging folder")
    try:
        with fs.open(file, "rb") as fh:
            manifest = json.loads(fh.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TwinError(f"{uri}/{MANIFEST}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("method") != "twin":
        raise TwinError(f"{uri}/{MANIFEST}: not amalgam's twin format {FORMAT}")
    return manifest
