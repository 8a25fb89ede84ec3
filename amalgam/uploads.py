"""Files written to S3 as multipart uploads with several large parts in flight; an upload can be
left open (every part stored, nothing visible) and completed later, by a commit."""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: A part is sent once this many bytes are buffered (S3 wants at least 5 MiB but the last); a
#: file whose size is known is cut into larger parts where it needs more than MAX_PARTS.
PART_BYTES = 8 << 20
MAX_PARTS = 10_000  # S3's most parts per upload
#: Parts uploading at once, per file (so at most this many parts plus one are buffered: writes
#: wait for a part to finish beyond that).
PARTS_IN_FLIGHT = 4


def open_for_write(fs: Any, path: str, *, deferred: bool = False, size: int | None = None) -> Any:
    """A binary file at ``path`` (of ``size`` bytes, where known) to write once, front to
    back: on S3 a :class:`ParallelUpload` (``deferred``: completed by its ``complete``, not by
    ``close``), elsewhere the filesystem's own file."""
    if is_s3(fs):
        return ParallelUpload(fs, path, deferred=deferred, size=size)
    return fs.open(path, "wb")


def is_s3(fs: Any) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols


class ParallelUpload:
    """One S3 object written as a multipart upload whose parts (``part_bytes`` each, but the
    last: :data:`PART_BYTES`, more for a ``size`` beyond :data:`MAX_PARTS` of them) upload on
    threads, up to :data:`PARTS_IN_FLIGHT` at once, while writing goes
    on. A file smaller than one part is one plain PUT. Nothing is visible at ``path`` before
    ``close``; ``discard`` aborts the upload.

    ``deferred``: the upload starts at once (``upload_id``), always as a multipart upload, and
    ``close`` only stores the last part: the object appears at ``path`` with ``complete`` (one
    request, the store joins the stored parts: no byte is sent or copied again), or never, with
    ``discard``."""

    def __init__(self, fs: Any, path: str, *, deferred: bool = False, size: int | None = None):
        self._fs, self.path = fs, path
        self.part_bytes = max(PART_BYTES, -(-(size or 0) // MAX_PARTS))
        self._bucket, self._key, _ = fs.split_path(path)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: deque[Future[dict[str, Any]]] = deque()
        self._done: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="amalgam-upload")
        self.deferred = deferred
        self.closed = False
        self._ended = False  # completed or aborted
        if deferred:
            self._start()

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def write(self, data: Any) -> int:
        """Buffer ``data``, sending each ``part_bytes`` as a part: a large write (a big
        tensor) is cut into parts, so the bytes held stay bounded whatever its size."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        while view.nbytes:
            room = self.part_bytes - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) >= self.part_bytes:
                self._send()
        return n

    def _start(self) -> None:
        self._upload_id = self._fs.call_s3(
            "create_multipart_upload", Bucket=self._bucket, Key=self._key
        )["UploadId"]

    def _send(self) -> None:
        if self._upload_id is None:
            self._start()
        while len(self._parts) >= PARTS_IN_FLIGHT:
            self._done.append(self._parts.popleft().result())
        number = len(self._done) + len(self._parts) + 1
        body, self._buffer = self._buffer, bytearray()
        self._parts.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        # the buffer itself is the body: no second copy of a part is held while it uploads
        out = self._fs.call_s3(
            "upload_part",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        return {"PartNumber": number, "ETag": out["ETag"]}

    def close(self) -> None:
        """Send what is left and complete the upload (one PUT for a small file); a
        ``deferred`` upload waits for ``complete``."""
        if self.closed:
            return
        if self._upload_id is None:
            self._fs.pipe_file(self.path, bytes(self._buffer))
            self._ended = True
        else:
            if self._buffer or not (self._parts or self._done):
                self._send()  # (an empty deferred file is one empty part)
            while self._parts:
                self._done.append(self._parts.popleft().result())
        self._finish()
        if not self.deferred:
            self.complete()

    def stored_bytes(self) -> int:
        """The bytes of the parts the store holds for this (closed, not yet completed)
        upload, as the store lists them."""
        total, marker = 0, 0
        while True:
            page = self._fs.call_s3(
                "list_parts",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumberMarker=marker,
            )
            total += sum(p["Size"] for p in page.get("Parts", []))
            if not page.get("IsTruncated"):
                return total
            marker = page["NextPartNumberMarker"]

    def complete(self) -> None:
        """Make the stored parts the object at ``path`` (once closed)."""
        if self._ended:
            return
        self._fs.call_s3(
            "complete_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": sorted(self._done, key=lambda p: p["PartNumber"])},
        )
        self._ended = True
        self._fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Abort: no object appears at ``path``, the parts sent are dropped."""
        if self._ended:
            return
        for part in self._parts:
            part.cancel()
        self._finish()
        self._ended = True
        if self._upload_id is not None:
            abort_upload(self._fs, self._bucket, self._key, self._upload_id)

    def marker(self) -> bytes:
        """What :func:`abort_marked` needs to abort this upload (kept where a crash's leftovers
        are cleaned)."""
        return json.dumps(
            {"bucket": self._bucket, "key": self._key, "upload": self._upload_id}
        ).encode()

    def _finish(self) -> None:
        self.closed = True
        self._buffer = bytearray()
        self._pool.shutdown(wait=True)
        self._fs.invalidate_cache(self.path)


def abort_upload(fs: Any, bucket: str, key: str, upload_id: str) -> None:
    fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)


def abort_marked(fs: Any, marker: bytes) -> None:
    """Abort the upload a :meth:`ParallelUpload.marker` names (one already completed or
    aborted: the store's error)."""
    m = json.loads(marker)
    abort_upload(fs, m["bucket"], m["key"], m["upload"])
