"""Zero-copy local views (a mapping per view, gone with it), and block-sized ranged reads from a
real S3 server: the same bytes as a plain read, memory bounded, every block fetched once."""

from __future__ import annotations

import hashlib
import itertools
import os
import uuid
from pathlib import Path

import pytest
import torch

from amalgam import reads
from amalgam.checkpoint import DTYPE_NAMES, open_checkpoint
from amalgam.writer import shard_header

# odd element counts, so that later tensors start at offsets that do not suit their dtype
LAYOUT = [
    ("a.bool", torch.bool, (3,)),
    ("b.bf16", torch.bfloat16, (37, 129)),
    ("c.f32", torch.float32, (301,)),
    ("d.u8", torch.uint8, (5,)),
    ("e.f16", torch.float16, (2, 2049)),
    ("f.f64", torch.float64, (7, 3)),
    ("g.i8", torch.int8, (9000,)),
    ("h.f32", torch.float32, ()),
    ("i.bf16", torch.bfloat16, (4096, 65)),
    ("j.f32", torch.float32, (1,)),
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        return torch.randint(-100 if dtype == torch.int8 else 0, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def write_in_order(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """A safetensors file with the tensors in exactly this order (safetensors' own writer
    reorders them by dtype, which would align every offset)."""
    entries = [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors]
    with open(path, "wb") as fh:
        fh.write(shard_header(entries, {}))
        for _, t in tensors:
            fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@pytest.fixture
def odd_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = [(n, sample(d, s, i)) for i, (n, d, s) in enumerate(LAYOUT)]
    path = tmp_path / "odd.safetensors"
    write_in_order(path, tensors)
    return path, dict(tensors)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def in_mapping_of(path: Path, t: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in a mapping of the file ``path`` (from /proc/self/maps)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi and len(fields) > 5 and fields[5] == str(path):
            return True
    return False


def test_views_equal_stored_bytes_for_every_dtype_and_offset(odd_file, monkeypatch) -> None:
    monkeypatch.setattr(reads, "MAP_MIN_BYTES", 1)  # map every tensor whose offset allows it
    path, want = odd_file
    with open_checkpoint(str(path)) as ckpt:
        mapped = 0
        for name, t in want.items():
            info = ckpt.info(name)
            view, fresh = ckpt.view(name), ckpt.tensor(name)
            assert view.dtype == t.dtype and view.shape == t.shape
            assert as_bytes(view) == as_bytes(fresh) == as_bytes(t), name
            aligned = info.start % t.element_size() == 0
            assert in_mapping_of(path, view) == aligned, name  # misaligned: a copy
            assert not in_mapping_of(path, fresh)
            mapped += aligned
        assert 0 < mapped < len(want)  # both paths taken


def test_small_tensors_are_read_not_mapped(odd_file) -> None:
    path, want = odd_file
    with open_checkpoint(str(path)) as ckpt:
        for name, t in want.items():
            view = ckpt.view(name)  # every tensor of the file is below 1 MiB
            assert torch.equal(view, t) and not in_mapping_of(path, view)


def test_writing_a_view_never_changes_the_file_or_other_reads(odd_file, monkeypatch) -> None:
    monkeypatch.setattr(reads, "MAP_MIN_BYTES", 1)
    path, want = odd_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with open_checkpoint(str(path)) as ckpt:
        view = ckpt.view("i.bf16")
        view.add_(1.0)  # a method may change its inputs in place
        assert not torch.equal(view, want["i.bf16"])
        assert torch.equal(ckpt.view("i.bf16"), want["i.bf16"])
        assert torch.equal(ckpt.tensor("i.bf16"), want["i.bf16"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_view_outlives_close_and_is_unmapped_when_dropped(odd_file, monkeypatch) -> None:
    monkeypatch.setattr(reads, "MAP_MIN_BYTES", 1)
    path, want = odd_file
    ckpt = open_checkpoint(str(path))
    view = ckpt.view("i.bf16")
    ckpt.close()  # the view's mapping is its own: never unmapped under it
    assert torch.equal(view, want["i.bf16"]) and in_mapping_of(path, view)
    del view
    assert str(path) not in Path("/proc/self/maps").read_text()


def rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_memory_stays_bounded_reading_a_file_larger_than_the_bound(tmp_path: Path) -> None:
    count, numel = 24, 1 << 20  # 24 tensors of 4 MiB: 96 MiB
    tensors = [(f"t{i:02d}", torch.full((numel,), float(i))) for i in range(count)]
    path = tmp_path / "big.safetensors"
    write_in_order(path, tensors)
    del tensors
    tensor_kb = numel * 4 // 1024
    with open_checkpoint(str(path)) as ckpt:
        before, peak, held = rss_file_kb(), 0, []
        for i, name in enumerate(ckpt.names()):
            view = ckpt.view(name)
            assert float(view.sum()) == float(i * numel)  # every page touched
            if i < 6:
                held.append(view)  # the measurement sees mapped pages: these six stay
            del view
            peak = max(peak, rss_file_kb() - before)
        assert rss_file_kb() - before > 5 * tensor_kb
        del held
        assert rss_file_kb() - before < tensor_kb  # dropped views leave nothing mapped
    assert peak < 6 * tensor_kb + 3 * tensor_kb, f"file pages held: {peak} kB"


@pytest.fixture
def s3_file(s3, odd_file) -> tuple[str, dict[str, torch.Tensor], int]:
    path, want = odd_file
    bucket = s3.make_bucket(f"reads-{uuid.uuid4().hex[:8]}")
    s3.filesystem().put_file(str(path), f"{bucket}/odd.safetensors")
    return f"s3://{bucket}/odd.safetensors", want, path.stat().st_size


def test_ranged_reads_equal_stored_bytes_and_fetch_each_block_once(
    s3_file, s3_counted, monkeypatch
) -> None:
    monkeypatch.setattr(reads, "RANGE_BYTES", 64 << 10)  # "i.bf16" spans 9 blocks
    monkeypatch.setattr(reads, "RANGES_IN_FLIGHT", 3)
    uri, want, size = s3_file
    with open_checkpoint(uri, **s3_counted.storage_options) as ckpt:
        header = s3_counted.proxy.received
        for name, t in want.items():
            assert as_bytes(ckpt.tensor(name)) == as_bytes(t), name
        data = s3_counted.proxy.received - header
        view = ckpt.view("i.bf16")  # a store has no mapping: a fresh tensor
        assert (
            torch.equal(view, want["i.bf16"]) and view.data_ptr() != ckpt.view("i.bf16").data_ptr()
        )
    # each block crossed the wire once (plus HTTP headers), though most hold several tensors:
    # the blocks that neighbouring tensors share were kept, not fetched again
    assert size <= data < 1.2 * size + 32 * 1024, (data, size)


def test_reads_in_file_order_share_requests_and_a_jump_reads_exactly(
    s3_file, s3, monkeypatch
) -> None:
    monkeypatch.setattr(reads, "RANGE_BYTES", 64 << 10)  # "i.bf16" needs 9 requests
    monkeypatch.setattr(reads, "RANGES_IN_FLIGHT", 3)
    uri, want, size = s3_file
    fs = s3.filesystem()
    path = uri.removeprefix("s3://")
    requests: list[tuple[int, int]] = []

    def cat(p: str, a: int, b: int) -> bytes:
        requests.append((a, b))
        return fs.cat_file(p, start=a, end=b)

    def read(reader: reads.RangeReader, name: str) -> None:
        info = ckpt.info(name)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        reader.read(path, size, info.start, info.end, out)
        assert out.numpy().tobytes() == as_bytes(want[name]), name

    with open_checkpoint(uri, **s3.storage_options()) as ckpt:
        names = sorted(want, key=lambda n: ckpt.info(n).start)
        reader = reads.RangeReader(cat)
        for name in names:  # file order
            read(reader, name)
        first, second = ckpt.info(names[0]), ckpt.info(names[1])
        assert requests[0] == (first.start, first.end)  # the first read: exactly its bytes
        rest = sorted(requests[1:])  # then contiguous requests, no byte fetched twice
        assert rest[0][0] == second.start and rest[-1][1] == size
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(rest))
        # as few requests as whole 64 KiB pieces allow: the small tensors shared them
        assert len(rest) == -(-(size - second.start) // (64 << 10))
        requests.clear()
        read(reads.RangeReader(cat), names[2])  # a jump (nothing read before): exact
        assert requests == [(ckpt.info(names[2]).start, ckpt.info(names[2]).end)]


def test_the_range_pool_works_in_a_forked_child() -> None:
    assert reads.range_pool().submit(int, "7").result() == 7  # the parent's threads exist
    pid = os.fork()
    if pid == 0:  # the child: a pool of its own, not the parent's dead threads
        ok = False
        try:
            ok = reads.range_pool().submit(int, "7").result(timeout=20) == 7
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
