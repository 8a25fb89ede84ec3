"""URI handling over fsspec: local paths, file://, s3://, hf://, memory://."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def resolve(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem that serves ``uri`` and the path inside it.

    Local paths come back absolute so that containment checks compare like with like.
    """
    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options)
    if isinstance(fs, LocalFileSystem):
        path = fs._strip_protocol(path)
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would type for ``path`` on ``fs`` (a plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_inside(
    fs_a: fsspec.AbstractFileSystem, a: str, fs_b: fsspec.AbstractFileSystem, b: str
) -> bool:
    """True when ``a`` equals ``b`` or lies beneath it on the same store."""
    if fs_a.protocol != fs_b.protocol:
        return False
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/")


def amalgam_home() -> Path:
    """Where amalgam keeps local state (caches, Ray's files): ``$AMALGAM_HOME``, else ./.amalgam."""
    return Path(os.environ.get("AMALGAM_HOME", ".amalgam")).resolve()
