"""Shared pytest fixtures: session environment, a real S3 server, tiny safetensors models."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from s3server import CountingProxy, S3Server, start_s3_server


@pytest.fixture(scope="session", autouse=True)
def session_env() -> Iterator[None]:
    """Environment every test runs under (s3fs takes its region from here, see STACK.md)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory, session_env: None) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback, started once per session; fails (never skips)."""
    try:
        server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    except RuntimeError as exc:
        pytest.fail(f"cannot start the S3 test server: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_proxy(s3: S3Server) -> Iterator[CountingProxy]:
    url = urlparse(s3.endpoint_url)
    proxy = CountingProxy((url.hostname, url.port)).start()
    yield proxy
    proxy.stop()


@dataclass
class CountedS3:
    """Storage options that route through ``proxy``, which counts the bytes on the wire."""

    storage_options: dict[str, Any]
    proxy: CountingProxy


@pytest.fixture
def s3_counted(s3: S3Server, s3_proxy: CountingProxy) -> CountedS3:
    """S3 through the counting proxy; counter at zero, and a fresh s3fs instance per open."""
    s3_proxy.reset()
    options = s3.storage_options(s3_proxy.url, skip_instance_cache=True)
    return CountedS3(options, s3_proxy)


CheckpointWriter = Callable[..., Path]


@pytest.fixture
def save_checkpoint() -> CheckpointWriter:
    """``save_checkpoint(folder, tensors, shards=1, config=None, filename=...)`` -> folder.

    One shard writes ``filename`` (default ``model.safetensors``); several shards write
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, tensors dealt
    round-robin in name order.
    """
    from safetensors.torch import save_file

    def write(
        folder: Path,
        tensors: dict,
        shards: int = 1,
        config: dict | None = None,
        filename: str = "model.safetensors",
    ) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if config is not None:
            name = "adapter_config.json" if filename.startswith("adapter") else "config.json"
            (folder / name).write_text(json.dumps(config))
        if shards == 1:
            save_file(tensors, str(folder / filename))
            return folder
        files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        parts: list[dict] = [{} for _ in files]
        weight_map = {}
        for i, name in enumerate(sorted(tensors)):
            parts[i % shards][name] = tensors[name]
            weight_map[name] = files[i % shards]
        for file, part in zip(files, parts, strict=True):
            save_file(part, str(folder / file))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return folder

    return write
