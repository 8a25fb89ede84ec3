"""Multipart uploads with parts in flight, against the real SeaweedFS server: the object holds
exactly the bytes written, in order; a discarded upload leaves nothing."""

from __future__ import annotations

import threading
import uuid

import pytest
import torch

from amalgam import uploads


@pytest.fixture
def bucket(s3) -> str:
    return s3.make_bucket(f"uploads-{uuid.uuid4().hex[:8]}")


def chunks(total: int, seed: int) -> list[bytes]:
    """Bytes in writes of uneven sizes (as tensors of a shard arrive)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=g).numpy().tobytes()
    cuts = sorted(torch.randint(0, total, (12,), generator=g).tolist())
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def test_parts_upload_while_writing_and_land_in_order(s3, bucket, monkeypatch) -> None:
    monkeypatch.setattr(uploads, "PART_BYTES", 5 << 20)  # S3's smallest part
    monkeypatch.setattr(uploads, "PARTS_IN_FLIGHT", 3)
    fs = s3.filesystem(skip_instance_cache=True)
    calls: list[str] = []
    active, peak = [0], [0]
    lock = threading.Lock()
    call_s3 = fs.call_s3

    def counting(method: str, *args, **kwargs):
        with lock:
            calls.append(method)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return call_s3(method, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(fs, "call_s3", counting)
    parts = chunks(23 << 20, seed=1)
    path = f"{bucket}/big.bin"
    f = uploads.open_for_write(fs, path)
    assert isinstance(f, uploads.ParallelUpload)
    for p in parts:
        assert f.write(memoryview(p)) == len(p)
    assert not fs.exists(path)  # nothing visible before close
    f.close()
    assert fs.cat_file(path) == b"".join(parts)
    assert calls[0] == "create_multipart_upload" and calls[-1] == "complete_multipart_upload"
    assert calls.count("upload_part") >= 4  # 23 MiB in parts of at least 5 MiB
    assert peak[0] >= 2  # parts were in flight together


def test_small_file_is_one_put_and_discard_leaves_nothing(s3, bucket, monkeypatch) -> None:
    monkeypatch.setattr(uploads, "PART_BYTES", 5 << 20)
    fs = s3.filesystem(skip_instance_cache=True)
    small = uploads.open_for_write(fs, f"{bucket}/small.bin")
    small.write(b"abc")
    small.close()
    assert fs.cat_file(f"{bucket}/small.bin") == b"abc"
    dropped = uploads.open_for_write(fs, f"{bucket}/dropped.bin")
    for p in chunks(11 << 20, seed=2):
        dropped.write(p)
    dropped.discard()
    assert not fs.exists(f"{bucket}/dropped.bin")
    uploads_left = fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert not [u for u in uploads_left if u["Key"] == "dropped.bin"]


def test_part_size_grows_only_past_the_store_part_limit(s3, bucket) -> None:
    fs = s3.filesystem(skip_instance_cache=True)
    part, most = uploads.PART_BYTES, uploads.MAX_PARTS
    for size, want in ((None, part), (part * most, part), (part * most + 1, part + 1)):
        f = uploads.open_for_write(fs, f"{bucket}/sized.bin", size=size)
        assert f.part_bytes == want and -(-(size or 0) // f.part_bytes) <= most
        f.discard()
