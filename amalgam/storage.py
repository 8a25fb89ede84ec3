"""URI handling over fsspec: local paths, file://, s3://, hf://, memory://."""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterable, Iterator
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


def local_uris(uris: Iterable[str], **storage_options: Any) -> list[str]:
    """Those of ``uris`` (each once, in order) that are paths on this machine's own disks."""
    return [u for u in dict.fromkeys(uris) if is_local(resolve(u, **storage_options)[0])]


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a user would type for ``path`` on ``fs`` (a plain path when local)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_inside(
    fs_a: fsspec.AbstractFileSystem, a: str, fs_b: fsspec.AbstractFileSystem, b: str
) -> bool:
    """True when ``a`` is ``b`` or lies beneath it on the same store, however either is
    spelled: local paths are compared after resolving symlinks, ``.``, ``..`` and repeated
    slashes, and by inode where a path exists (case-folding filesystems, bind mounts); object
    store keys after collapsing repeated slashes."""
    if fs_a.protocol != fs_b.protocol:
        return False
    if not is_local(fs_a):
        a, b = _key(a), _key(b)
        return a == b or a.startswith(b + "/")
    a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b or a.startswith(b.rstrip("/") + "/"):
        return True
    if not os.path.exists(b):
        return False
    for parent in (a, *Path(a).parents):
        if os.path.exists(parent) and os.path.samefile(parent, b):
            return True
    return False


def _key(path: str) -> str:
    return "/".join(part for part in path.split("/") if part)


# Store client libraries whose transport failures (a reset connection, a body cut short after
# their retries) are not OSError: matched by module, so that none is imported for local work.
CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests")


@contextlib.contextmanager
def store_errors(what: str = "") -> Iterator[None]:
    """A failure of a store client's transport inside the block becomes a ConnectionError (an
    OSError; its message names ``what`` when given), the client's error chained: callers then
    handle one kind of storage failure, and retry rules that look for OSError see it."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in CLIENT_MODULES:
            raise
        prefix = f"{what}: " if what else ""
        raise ConnectionError(f"{prefix}{type(exc).__name__}: {exc}") from exc


def amalgam_home() -> Path:
    """Where amalgam keeps local state (caches, Ray's files): ``$AMALGAM_HOME``, else ./.amalgam."""
    return Path(os.environ.get("AMALGAM_HOME", ".amalgam")).resolve()
