"""Checkpoints on a real S3 server (SeaweedFS): layouts, bit-exact reads, bytes on the wire."""

from __future__ import annotations

import uuid

import pytest
import torch

from amalgam.checkpoint import open_checkpoint
from amalgam.errors import CheckpointError

BUCKET = "models"
HTTP_OVERHEAD = 64 << 10  # response headers, HEADs and listings: generous, still ≪ the file
BIG = 4 << 20  # elements of the large tensor: 16 MiB of float32


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def header_size(path) -> int:
    """8-byte length prefix plus JSON header of a local safetensors file."""
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.make_bucket(BUCKET)


@pytest.fixture
def upload(s3, bucket):
    """``upload(local_folder) -> "s3://models/<unique>"`` (a fresh prefix per call)."""
    fs = s3.filesystem()

    def put(folder) -> str:
        prefix = f"{bucket}/{uuid.uuid4().hex[:12]}"
        fs.put(f"{folder}/", prefix, recursive=True)
        return f"s3://{prefix}"

    return put


def sharded_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "layers.0.q.weight": torch.randn(32, 32, generator=g),
        "layers.0.q.bias": torch.tensor([float("nan"), -0.0, float("inf"), 1.0]),
        "layers.1.q.weight": torch.randn(32, 32, generator=g).to(torch.float16),
        "position_ids": torch.arange(64, dtype=torch.int64),
        "mask": torch.randint(0, 2, (4, 4), generator=g, dtype=torch.int32),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def test_sharded_model_on_s3_reads_bit_exact(tmp_path, s3, upload, save_checkpoint):
    tensors = sharded_tensors()
    config = {"model_type": "llama", "hidden_size": 32}
    folder = save_checkpoint(tmp_path / "m", tensors, shards=3, config=config)
    uri = upload(folder)

    with open_checkpoint(uri, **s3.storage_options()) as ckpt:
        assert ckpt.kind == "model"
        assert len(ckpt.files) == 3
        assert sorted(ckpt.names()) == sorted(tensors)
        assert ckpt.config == config
        assert ckpt.side_files() == ["config.json"]
        for name, t in tensors.items():
            assert ckpt.shape(name) == tuple(t.shape)
            assert ckpt.dtype(name) == t.dtype
            got = ckpt.tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert raw_bytes(got) == raw_bytes(t), name
        remote_hash = ckpt.content_hash()
    assert remote_hash == open_checkpoint(str(folder)).content_hash()  # content, not location


def test_content_hash_on_s3_sees_a_rewrite(tmp_path, s3, upload, save_checkpoint):
    """Rewriting an object with same-size content within the same second changes the hash."""
    folder = save_checkpoint(tmp_path / "m", {"w": torch.zeros(256)})
    uri = upload(folder)
    options = s3.storage_options()
    before = open_checkpoint(uri, **options).content_hash()
    key = uri.removeprefix("s3://") + "/model.safetensors"
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    s3.filesystem().pipe_file(key, bytes(data))
    assert open_checkpoint(uri, **options).content_hash() != before


def test_missing_s3_checkpoint_names_it(s3, bucket):
    uri = f"s3://{bucket}/no-such-model"
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        open_checkpoint(uri, **s3.storage_options())
    assert uri in str(err.value)


def test_index_naming_missing_shard_on_s3(tmp_path, s3, upload, save_checkpoint):
    folder = save_checkpoint(tmp_path / "m", sharded_tensors(), shards=2)
    (folder / "model-00001-of-00002.safetensors").unlink()
    uri = upload(folder)
    with pytest.raises(CheckpointError, match="shard files missing") as err:
        open_checkpoint(uri, **s3.storage_options())
    assert f"{uri}/model.safetensors.index.json" in str(err.value)
    assert "model-00001-of-00002.safetensors" in str(err.value)


@pytest.fixture
def big_model(tmp_path, upload, save_checkpoint):
    """One file: a 16 MiB tensor between two small ones. Returns (uri, local file, tensors)."""
    g = torch.Generator().manual_seed(2)
    tensors = {
        "a.small": torch.randn(64, generator=g),
        "b.big": torch.randn(BIG, generator=g),
        "c.small": torch.randn(8, 8, generator=g).to(torch.bfloat16),
    }
    folder = save_checkpoint(tmp_path / "big", tensors, config={"model_type": "x"})
    return upload(folder), folder / "model.safetensors", tensors


def test_open_over_s3_reads_only_headers(s3_counted, big_model):
    uri, local, _ = big_model
    file_size = local.stat().st_size
    proxy = s3_counted.proxy
    with open_checkpoint(uri, **s3_counted.storage_options) as ckpt:
        opened = proxy.received
        assert ckpt.names() == ["a.small", "b.big", "c.small"]
    # one header (with s3fs' read-ahead block of 64 KiB), config.json, HEADs and a listing
    assert opened < header_size(local) + (64 << 10) + HTTP_OVERHEAD, opened
    assert opened * 50 < file_size, (opened, file_size)


def test_one_small_tensor_over_s3_transfers_only_its_bytes(s3_counted, big_model):
    uri, local, tensors = big_model
    file_size = local.stat().st_size
    proxy = s3_counted.proxy
    with open_checkpoint(uri, **s3_counted.storage_options) as ckpt:
        for name in ("a.small", "c.small"):
            proxy.reset()
            got = ckpt.tensor(name)
            received = proxy.received
            assert raw_bytes(got) == raw_bytes(tensors[name])
            nbytes = ckpt.info(name).nbytes
            assert received < header_size(local) + nbytes + HTTP_OVERHEAD, (name, received)
            assert received * 100 < file_size, (name, received, file_size)

        # positive control: the proxy sees the big tensor when it is the one read
        proxy.reset()
        got = ckpt.tensor("b.big")
        big = ckpt.info("b.big").nbytes
        assert big <= proxy.received < big + HTTP_OVERHEAD
        assert raw_bytes(got) == raw_bytes(tensors["b.big"])


@pytest.fixture
def wrong_secret(s3, upload, tmp_path, save_checkpoint) -> tuple[str, dict]:
    uri = upload(save_checkpoint(tmp_path / "m", {"w": torch.ones(2)}))
    return uri, {**s3.storage_options(), "secret": "wrong", "skip_instance_cache": True}


def test_wrong_secret_is_a_checkpoint_error_naming_the_uri(wrong_secret):
    uri, options = wrong_secret
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(uri, **options)
    assert uri in str(err.value)
    assert "Forbidden" in str(err.value)  # refused by the server, not reported missing
    assert "no such checkpoint" not in str(err.value)
