"""Files written to S3 as multipart uploads with several large parts in flight."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: A part is sent once this many bytes are buffered (S3 wants at least 5 MiB but the last).
PART_BYTES = 16 << 20
#: Parts uploading at once, per file (so at most this many parts plus one are buffered).
PARTS_IN_FLIGHT = 4


def open_for_write(fs: Any, path: str) -> Any:
    """A binary file at ``path`` to write once, front to back: on S3 a
    :class:`ParallelUpload`, elsewhere the filesystem's own file."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols:
        return ParallelUpload(fs, path)
    return fs.open(path, "wb")


class ParallelUpload:
    """One S3 object written as a multipart upload whose parts (:data:`PART_BYTES` or more)
    upload on threads, up to :data:`PARTS_IN_FLIGHT` at once, while writing goes on. A file
    smaller than one part is one plain PUT. Nothing is visible at ``path`` before ``close``;
    ``discard`` aborts the upload."""

    def __init__(self, fs: Any, path: str):
        self._fs, self.path = fs, path
        self._bucket, self._key, _ = fs.split_path(path)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: deque[Future[dict[str, Any]]] = deque()
        self._done: list[dict[str, Any]] = []
        self._pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="amalgam-upload")
        self.closed = False

    def write(self, data: Any) -> int:
        self._buffer += data
        if len(self._buffer) >= PART_BYTES:
            self._send()
        return memoryview(data).nbytes

    def _send(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._fs.call_s3(
                "create_multipart_upload", Bucket=self._bucket, Key=self._key
            )["UploadId"]
        while len(self._parts) >= PARTS_IN_FLIGHT:
            self._done.append(self._parts.popleft().result())
        number = len(self._done) + len(self._parts) + 1
        body, self._buffer = self._buffer, bytearray()
        self._parts.append(self._pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        out = self._fs.call_s3(
            "upload_part",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=bytes(body),
        )
        return {"PartNumber": number, "ETag": out["ETag"]}

    def close(self) -> None:
        """Send what is left and complete the upload (one PUT for a small file)."""
        if self.closed:
            return
        if self._upload_id is None:
            self._fs.pipe_file(self.path, bytes(self._buffer))
        else:
            if self._buffer:
                self._send()
            while self._parts:
                self._done.append(self._parts.popleft().result())
            self._fs.call_s3(
                "complete_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": sorted(self._done, key=lambda p: p["PartNumber"])},
            )
        self._finish()

    def discard(self) -> None:
        """Abort: no object appears at ``path``, the parts sent are dropped."""
        if self.closed:
            return
        for part in self._parts:
            part.cancel()
        self._finish()
        if self._upload_id is not None:
            self._fs.call_s3(
                "abort_multipart_upload",
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
            )

    def _finish(self) -> None:
        self.closed = True
        self._buffer = bytearray()
        self._pool.shutdown(wait=True)
        self._fs.invalidate_cache(self.path)
