"""A real multi-node Ray cluster on one machine: a head and worker nodes, each in a network
namespace of its own, joined by a Linux bridge on a private /24, with SeaweedFS on the bridge.

Every name this creates starts with ``amg-<pid>`` (the pid of the process that owns it), so
that :func:`clean_leftovers` can remove what a crashed run left behind. Nothing binds to or
talks through the machine's own external address: Ray and S3 traffic stays on the bridge.
Commands run inside a node with :meth:`Cluster.run` or :meth:`Cluster.popen`
(``ip netns exec``)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.s3server import S3Server, start_s3_server

PREFIX = "amg-"
RAY_PORT = 6379  # each namespace has its own ports: the same number on every node is fine
#: Ray on more than one node needs the cluster switch on; the rest keeps it quiet and local.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # a dead node is noticed within seconds, not the default half a minute
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check=check)


def namespaces_usable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (tried for real)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "no `ip`/`tc` (iproute2) on this machine"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    ip("netns", "delete", probe, check=False)
    return None if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


def _owner_alive(name: str) -> bool:
    found = re.match(rf"{PREFIX}(?:br-)?(\d+)", name)
    if not found:
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(int(found.group(1)), 0)
        return True
    return False


def clean_leftovers() -> None:
    """Remove namespaces (and every process in them), links and node temp dirs of runs whose
    owner is gone."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and not _owner_alive(name):
            _remove_namespace(name)
    for line in ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and not _owner_alive(name):
            ip("link", "delete", name, check=False)
    for folder in Path("/tmp").glob(f"{PREFIX}*"):
        if not _owner_alive(folder.name):
            _kill_working_in(folder)  # SeaweedFS runs on the host, in its own folder
            shutil.rmtree(folder, ignore_errors=True)


def _kill_working_in(folder: Path) -> None:
    """SIGKILL every process whose working directory is ``folder`` or inside it."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                    os.kill(int(proc.name), signal.SIGKILL)


def _kill_all_in(ns: str) -> None:
    for _ in range(20):
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _remove_namespace(ns: str) -> None:
    _kill_all_in(ns)
    ip("netns", "delete", ns, check=False)


def pick_subnet() -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 that no address or route of this machine overlaps."""
    used = []
    for line in (ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout).splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word[0].isdigit():
                    used.append(ipaddress.ip_network(word, strict=False))
    start = os.getpid() % 200 + 20
    for x in [*range(start, 250), *range(20, start)]:
        net = ipaddress.ip_network(f"10.213.{x}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet for the test cluster")


@dataclass
class Node:
    """One Ray node: its namespace, address, the host end of its veth and its Ray process."""

    name: str
    ns: str
    address: str
    host_veth: str
    temp_dir: Path
    process: subprocess.Popen | None = None

    def bytes_received(self) -> int:
        """Bytes the node has received over its link (what it downloaded, from S3 or Ray)."""
        return int(Path(f"/sys/class/net/{self.host_veth}/statistics/tx_bytes").read_text())


@dataclass
class Cluster:
    """A bridge, a head and worker namespaces, SeaweedFS on the bridge, Ray on every node."""

    root: Path
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    bridge: str = ""
    gateway: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    s3: S3Server | None = None
    start_seconds: float = 0.0
    temp_dirs: list[Path] = field(default_factory=list)
    log_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.bridge = f"{PREFIX}br-{os.getpid()}"
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- network --------------------------------------------------------------------------
    def create_network(self, workers: int) -> None:
        net = pick_subnet()
        hosts = net.hosts()
        self.gateway = str(next(hosts))
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, name in enumerate(["head", *(f"w{k}" for k in range(1, workers + 1))]):
            ns = f"{self.tag}-{name}"
            host_veth, inner = f"{self.tag}-h{i}", f"{self.tag}-n{i}"
            # a short temp dir: Ray's session folder holds unix sockets (107-byte paths)
            temp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-{name}-", dir="/tmp"))
            node = Node(name, ns, str(next(hosts)), host_veth, temp)
            self.nodes[name] = node
            ip("netns", "add", ns)
            ip("link", "add", host_veth, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", host_veth, "master", self.bridge)
            ip("link", "set", host_veth, "up")
            self.run(name, ["ip", "link", "set", "lo", "up"])
            self.run(name, ["ip", "link", "set", inner, "name", "eth0"])
            self.run(name, ["ip", "addr", "add", f"{node.address}/{net.prefixlen}", "dev", "eth0"])
            self.run(name, ["ip", "link", "set", "eth0", "up"])

    def limit(self, name: str, mbytes_per_s: float | None) -> None:
        """Cap node ``name``'s link to ``mbytes_per_s`` MB/s each way (None: no cap)."""
        node = self.nodes[name]
        for prefix, dev in (([], node.host_veth), (["ip", "netns", "exec", node.ns], "eth0")):
            if mbytes_per_s is None:
                _run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
                continue
            rate = f"{int(mbytes_per_s * 8_000)}kbit"
            burst = f"{max(int(mbytes_per_s * 1e6 / 100), 16_000)}"  # about 10 ms worth
            tbf = ["tbf", "rate", rate, "burst", burst, "latency", "200ms"]
            _run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *tbf])

    # -- processes in a node ----------------------------------------------------------------
    def command(self, name: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[name].ns, *args]

    def run(self, name: str, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``args`` inside node ``name``; raises on a non-zero exit unless check=False."""
        return _run(self.command(name, args), **kwargs)

    def popen(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> Any:
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.command(name, args),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def pids(self, name: str) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.nodes[name].ns).stdout.split()]

    # -- S3 and Ray ---------------------------------------------------------------------------
    def start_s3(self) -> S3Server:
        """SeaweedFS on the host, bound to the bridge address only; its data in a folder named
        for this cluster (its working directory: what :func:`clean_leftovers` looks for)."""
        data = Path(tempfile.mkdtemp(prefix=f"{self.tag}-s3-", dir="/tmp"))
        self.temp_dirs.append(data)
        self.s3 = start_s3_server(data, host=self.gateway)
        return self.s3

    @property
    def ray_address(self) -> str:
        return f"{self.nodes['head'].address}:{RAY_PORT}"

    def ray_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of Ray nodes and drivers: this interpreter's, Ray's cluster
        switches, no proxies (all traffic is on the bridge)."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.pop("RAY_ADDRESS", None)
        return {**env, **RAY_ENV, **(extra or {})}

    def driver_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of an ``amalgam`` driver as a user's shell has it: ``RAY_ADDRESS``
        of the head, none of Ray's switches."""
        env = {k: v for k, v in self.ray_env().items() if k not in RAY_ENV}
        return {**env, "RAY_ADDRESS": self.ray_address, **(extra or {})}

    def start_ray(self, name: str, cpus: int, object_store_mb: int = 128) -> None:
        node = self.nodes[name]
        role = (
            ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
            if name == "head"
            else [f"--address={self.ray_address}"]
        )
        args = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            *role,
            f"--node-ip-address={node.address}",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            f"--temp-dir={node.temp_dir}",
            "--disable-usage-stats",
            "--block",
        ]
        env = self.ray_env({"TMPDIR": str(node.temp_dir)})
        node.process = self.popen(name, args, self.log_dir / f"ray-{name}.log", env)

    def alive_nodes(self) -> int:
        """Nodes the head's GCS reports alive (asked from inside the head namespace)."""
        probe = (
            "import ray\n"
            f"ray.init(address='{self.ray_address}', log_to_driver=False)\n"
            "print(sum(1 for n in ray.nodes() if n['Alive']))\n"
        )
        done = self.run(
            "head", [sys.executable, "-c", probe], env=self.ray_env(), check=False, timeout=60
        )
        lines = done.stdout.strip().splitlines()
        return int(lines[-1]) if done.returncode == 0 and lines else 0

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() == n:
                return
            for node in self.nodes.values():
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"ray on {node.name} exited: {self.log_tail(node.name)}")
            time.sleep(1)
        raise RuntimeError(f"fewer than {n} Ray nodes alive after {timeout:.0f} s")

    def raylet_pid(self, name: str) -> int:
        for pid in self.pids(name):
            with contextlib.suppress(OSError):
                exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                if exe.endswith(b"/raylet"):
                    return pid
        raise RuntimeError(f"no raylet running on node {name}")

    def kill_node(self, name: str) -> None:
        """SIGKILL node ``name``'s raylet, then everything else in its namespace."""
        os.kill(self.raylet_pid(name), signal.SIGKILL)
        _kill_all_in(self.nodes[name].ns)
        self.nodes[name].process = None

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.log_dir / f"ray-{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- teardown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop Ray on every node (by the pids in its namespace), SeaweedFS, and remove the
        namespaces, veths and bridge. Safe to call on a cluster half made."""
        for node in reversed(list(self.nodes.values())):
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(10)
            _remove_namespace(node.ns)
            ip("link", "delete", node.host_veth, check=False)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        if self.s3 is not None:
            self.s3.stop()
        ip("link", "delete", self.bridge, check=False)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _run(args: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@contextlib.contextmanager
def ray_cluster(
    root: Path, workers: int = 2, head_cpus: int = 0, worker_cpus: int = 1
) -> Iterator[Cluster]:
    """A started cluster (SeaweedFS up, ``workers + 1`` Ray nodes alive); removed on exit,
    also when starting it fails."""
    clean_leftovers()
    cluster = Cluster(root)
    try:
        t0 = time.monotonic()
        cluster.create_network(workers)
        cluster.start_s3()
        cluster.start_ray("head", head_cpus)
        cluster.wait_nodes(1)
        for k in range(1, workers + 1):
            cluster.start_ray(f"w{k}", worker_cpus)
        cluster.wait_nodes(workers + 1)
        cluster.start_seconds = time.monotonic() - t0
        yield cluster
    finally:
        cluster.close()
