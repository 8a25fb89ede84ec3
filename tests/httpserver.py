"""A real HTTP file server on loopback for tests: a folder served with byte ranges (what
fsspec's HTTP file system needs to read a safetensors header and then one tensor)."""

from __future__ import annotations

import functools
import io
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeHandler(SimpleHTTPRequestHandler):
    """Python's file handler plus ``Range: bytes=a-b`` (answered 206 with that slice)."""

    def send_head(self) -> io.BufferedIOBase | None:
        path = self.translate_path(self.path)
        found = RANGE.fullmatch(self.headers.get("Range", "").strip())
        if found is None or not os.path.isfile(path):
            return super().send_head()
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            start = int(found[1]) if found[1] else max(size - int(found[2] or 0), 0)
            end = min(int(found[2]), size - 1) if found[1] and found[2] else size - 1
            fh.seek(start)
            data = fh.read(max(end - start + 1, 0))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: requests are not logged."""


@contextmanager
def http_folder(root: Path) -> Iterator[str]:
    """``root`` served on 127.0.0.1 (a free port) for the block: yields ``http://127.0.0.1:P``."""
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
