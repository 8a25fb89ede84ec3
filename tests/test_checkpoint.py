"""Local checkpoints: layouts, metadata, bit-exact reads, content hash and bad input."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import torch as safetensors_torch

from amalgam.checkpoint import file_hash, file_stamp, open_checkpoint
from amalgam.errors import CheckpointError


def sample_tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes, awkward floats (NaN with payload, -0.0, inf), a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40], dtype=torch.float32)
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.q.weight": torch.randn(8, 8, generator=g),
        "layers.0.attn.q.bias": torch.cat([special, nan_payload]),
        "layers.0.mlp.up.weight": torch.randn(4, 8, generator=g).to(torch.float16),
        "position_ids": torch.arange(32, dtype=torch.int64).reshape(1, 32),
        "token_type_ids": torch.randint(-100, 100, (3, 5), generator=g, dtype=torch.int32),
        "mask": torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8),
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert raw_bytes(got) == raw_bytes(want)


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    """A safetensors file byte by byte, so that the header can be anything."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return sample_tensors()


# -- layouts and metadata -----------------------------------------------------------------------


def test_sentence_transformers_module_configs_are_side_files_only_beside_the_weights(
    tmp_path, save_checkpoint, tensors
):
    folder = save_checkpoint(tmp_path / "m", tensors, config={"model_type": "bert"})
    modules = [
        {"idx": 0, "name": "0", "path": ""},
        {"idx": 1, "name": "1", "path": "1_Pooling"},
        {"idx": 2, "name": "2", "path": ".."},
        {"idx": 3, "name": "3", "path": "../elsewhere"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    for sub in ("1_Pooling", "../elsewhere"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(str(folder)) as ckpt:
        assert ckpt.side_files() == ["config.json", "modules.json", "1_Pooling/config.json"]


def test_model_folder_metadata_and_values(tmp_path, save_checkpoint, tensors):
    config = {"model_type": "llama", "hidden_size": 8}
    folder = save_checkpoint(tmp_path / "m", tensors, config=config)
    with open_checkpoint(str(folder)) as ckpt:
        assert ckpt.kind == "model"
        assert ckpt.files == ["model.safetensors"]
        assert sorted(ckpt.names()) == sorted(tensors)
        assert ckpt.config == config
        assert ckpt.side_files() == ["config.json"]
        for name, t in tensors.items():
            assert ckpt.shape(name) == tuple(t.shape)
            assert ckpt.dtype(name) == t.dtype
            assert ckpt.info(name).nbytes == t.numel() * t.element_size()
            assert_bit_exact(ckpt.tensor(name), t)
        assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert ckpt.num_params == sum(t.numel() for t in tensors.values())


def test_tensor_reads_are_fresh_copies(tmp_path, save_checkpoint, tensors):
    folder = save_checkpoint(tmp_path / "m", tensors)
    with open_checkpoint(str(folder)) as ckpt:
        a = ckpt.tensor("layers.0.attn.q.weight")
        a.zero_()
        assert_bit_exact(ckpt.tensor("layers.0.attn.q.weight"), tensors["layers.0.attn.q.weight"])


def test_sharded_folder_with_index(tmp_path, save_checkpoint, tensors):
    folder = save_checkpoint(tmp_path / "m", tensors, shards=3, config={"model_type": "x"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with open_checkpoint(str(folder)) as ckpt:
        assert ckpt.kind == "model"
        assert ckpt.files == sorted(set(index.values()))
        assert len(ckpt.files) == 3
        assert sorted(ckpt.names()) == sorted(tensors)
        for name, t in tensors.items():
            assert ckpt.info(name).file == index[name]
            assert_bit_exact(ckpt.tensor(name), t)
        assert ckpt.config == {"model_type": "x"}


def test_adapter_folder(tmp_path, save_checkpoint):
    lora = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(4, 16),
        "base_model.model.q_proj.lora_B.weight": torch.zeros(16, 4),
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    folder = save_checkpoint(
        tmp_path / "a", lora, config=config, filename="adapter_model.safetensors"
    )
    with open_checkpoint(str(folder)) as ckpt:
        assert ckpt.kind == "adapter"
        assert ckpt.files == ["adapter_model.safetensors"]
        assert ckpt.config == config
        for name, t in lora.items():
            assert_bit_exact(ckpt.tensor(name), t)


def test_single_file(tmp_path, save_checkpoint, tensors):
    save_checkpoint(tmp_path, tensors, filename="weights.safetensors", config={"ignored": True})
    with open_checkpoint(str(tmp_path / "weights.safetensors")) as ckpt:
        assert ckpt.kind == "file"
        assert ckpt.files == ["weights.safetensors"]
        assert ckpt.config is None
        assert ckpt.side_files() == []
        assert_bit_exact(ckpt.tensor("embed.weight"), tensors["embed.weight"])


def test_safetensors_metadata_is_kept(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt", "origin": "test"})
    with open_checkpoint(str(path)) as ckpt:
        assert ckpt.metadata == {"w.safetensors": {"format": "pt", "origin": "test"}}


def test_unknown_tensor_names_it(tmp_path, save_checkpoint, tensors):
    folder = save_checkpoint(tmp_path / "m", tensors)
    with open_checkpoint(str(folder)) as ckpt, pytest.raises(CheckpointError, match="'nope'"):
        ckpt.tensor("nope")


# -- content hash -------------------------------------------------------------------------------


def test_content_hash_stable_and_sensitive_to_one_byte(tmp_path, save_checkpoint, tensors):
    folder = save_checkpoint(tmp_path / "m", tensors, shards=2)
    copy = save_checkpoint(tmp_path / "copy", tensors, shards=2)
    first = open_checkpoint(str(folder)).content_hash()
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert open_checkpoint(str(folder)).content_hash() == first
    assert open_checkpoint(str(copy)).content_hash() == first  # content, not location

    shard = folder / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor: same size, header untouched
    shard.write_bytes(bytes(data))
    assert open_checkpoint(str(folder)).content_hash() != first


def test_a_store_without_etags_is_hashed_every_time() -> None:
    """A file on a store that reports no ETag, content hash or blob id (memory:// here) is
    never served from the hash cache: a same-size rewrite is seen."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/stampless/w.bin", b"a" * 64)
    first = file_hash(fs, "/stampless/w.bin")
    assert file_stamp(fs, "/stampless/w.bin") is None
    fs.pipe_file("/stampless/w.bin", b"b" * 64)
    assert file_hash(fs, "/stampless/w.bin") != first
    fs.rm("/stampless", recursive=True)


# -- bad input ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        open_checkpoint(str(missing))
    assert str(missing) in str(err.value)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights") as err:
        open_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_not_a_weights_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a \.safetensors file") as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_truncated_mid_data(tmp_path, save_checkpoint):
    folder = save_checkpoint(tmp_path / "m", {"a": torch.ones(64), "b": torch.ones(64)})
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # cuts into the last tensor, "b"
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(str(folder))
    assert str(path) in str(err.value)
    assert "'b'" in str(err.value)


def test_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="shorter than 8 bytes") as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("declared", [0, 10**12, 2**64 - 1], ids=["zero", "huge", "max"])
def test_corrupt_header_length(tmp_path, declared):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", declared) + b'{"a": 1}' + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert f"declared length {declared}" in str(err.value)


@pytest.mark.parametrize(
    "header",
    [b"this is not json at all", b"\xff\xfe\x00garbage", b"[1, 2, 3]"],
    ids=["text", "binary", "json-list"],
)
def test_header_not_a_json_object(tmp_path, header):
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]},  # 3 floats, shape says 4
        {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 20]},  # 5 floats
        {"dtype": "BF16", "shape": [4], "data_offsets": [8, 0]},  # reversed
        {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},  # right size, past the end
    ],
    ids=["short", "long", "reversed", "past-end"],
)
def test_byte_range_not_matching_shape(tmp_path, entry):
    path = write_raw_safetensors(tmp_path / "bad.safetensors", {"w.weight": entry}, b"\0" * 20)
    with pytest.raises(CheckpointError, match="byte range") as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert "'w.weight'" in str(err.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [1]},
        {"dtype": "F32", "shape": [1], "data_offsets": 4},
        {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]},
    ],
    ids=["no-offsets", "offsets-not-pair", "unknown-dtype"],
)
def test_malformed_tensor_entry(tmp_path, entry):
    path = write_raw_safetensors(tmp_path / "bad.safetensors", {"w.weight": entry}, b"\0" * 8)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert "'w.weight'" in str(err.value)


def test_index_names_missing_shard(tmp_path, save_checkpoint, tensors):
    folder = save_checkpoint(tmp_path / "m", tensors, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files missing") as err:
        open_checkpoint(str(folder))
    msg = str(err.value)
    assert str(folder / "model.safetensors.index.json") in msg
    assert "model-00002-of-00002.safetensors" in msg


def test_same_tensor_in_two_shards(tmp_path, save_checkpoint):
    from safetensors.torch import save_file

    both = {"a": torch.ones(2), "b": torch.ones(2)}
    folder = save_checkpoint(tmp_path / "m", both, shards=2)
    save_file(both, str(folder / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="also in another shard") as err:
        open_checkpoint(str(folder))
    assert "model-00002-of-00002.safetensors" in str(err.value)


def test_pickle_refused_without_allow_pickle(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(4, dtype=torch.int64)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing pickle") as err:
        open_checkpoint(str(tmp_path))
    assert "pytorch_model.bin" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_pickle_loaded_with_allow_pickle(tmp_path):
    state = {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(4, dtype=torch.int64)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "x"}')
    with open_checkpoint(str(tmp_path), allow_pickle=True) as ckpt:
        assert ckpt.kind == "model"
        assert sorted(ckpt.names()) == ["b", "w"]
        assert ckpt.config == {"model_type": "x"}
        assert ckpt.num_params == 16
        for name, t in state.items():
            assert ckpt.shape(name) == tuple(t.shape)
            assert_bit_exact(ckpt.tensor(name), t)


def test_pickle_with_code_refused_even_when_allowed(tmp_path):
    """weights_only=True: a pickle that would run code on load is an error, not an execution."""
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "obj": Touch(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load pickle") as err:
        open_checkpoint(str(tmp_path), allow_pickle=True)
    assert "pytorch_model.bin" in str(err.value)
    assert not marker.exists()


class Touch:
    """Unpickling this creates a file: stands in for arbitrary code in a hostile pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- the safetensors library's header rules, each broken by one crafted file ------------------


def f32_entry(a: int, b: int) -> dict:
    return {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (b'{"w": ' + json.dumps(f32_entry(0, 4)).encode() + b', "w": '
         + json.dumps(f32_entry(4, 8)).encode() + b"}", 8, "key w twice"),
        ({"a": f32_entry(0, 8), "b": f32_entry(0, 8)}, 8, "offset 0, which overlaps"),
        ({"a": f32_entry(0, 4), "b": f32_entry(8, 12)}, 12, "offset 8, which leaves a gap"),
        ({"a": f32_entry(4, 8)}, 8, "offset 4, which leaves a gap"),
        ({"a": f32_entry(0, 4)}, 12, "the file has trailing bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-8, -4]}}, 4, "non-negative"),
        ({"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}, 4, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, 4, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, 4, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, 4, "non-negative"),
        ({"a": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
        ({"a": [0, 4]}, 4, "'a' has a malformed entry"),
        ({"__metadata__": ["x"], "a": f32_entry(0, 4)}, 4, "__metadata__ must map strings"),
        ({"__metadata__": {"k": 1}, "a": f32_entry(0, 4)}, 4, "__metadata__ must map strings"),
        (b'  {"a": 1}', 4, "not a JSON object"),
        (b"{" * 100_000 + b"}" * 100_000, 4, "corrupt safetensors header"),
    ],
    ids=[
        "duplicate-name", "overlap", "gap", "gap-at-start", "trailing-bytes", "negative-offsets",
        "string-shape", "float-shape", "float-offset", "bool-shape", "three-offsets",
        "dtype-not-string", "entry-not-object", "metadata-not-object", "metadata-not-strings",
        "leading-space", "deeply-nested",
    ],
)  # fmt: skip
def test_header_rules_of_the_safetensors_library(tmp_path, header, data, message):
    """Each file here is refused by ``safetensors`` itself; opening it must fail naming the
    file, and never read header bytes or another tensor's bytes as weights."""
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * data)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        open_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(Exception):  # noqa: B017  (the library raises its own error types)
        safetensors_torch.load_file(str(path))


def test_header_padding_and_empty_tensors_are_valid(tmp_path):
    """What the library accepts stays accepted: trailing spaces after the JSON object (the
    8-byte alignment padding) and zero-size tensors sharing an offset."""
    header = {
        "__metadata__": {"format": "pt"},
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "a": f32_entry(0, 8),
    }
    raw = json.dumps(header).encode() + b"   "
    path = write_raw_safetensors(tmp_path / "ok.safetensors", raw, b"\0" * 8)
    with open_checkpoint(str(path)) as ckpt:
        assert ckpt.shape("a") == (2,) and ckpt.shape("e") == (0, 3)
    safetensors_torch.load_file(str(path))  # the reference library agrees
