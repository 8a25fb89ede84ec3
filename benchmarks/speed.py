"""Speed benchmark: amalgam against the read bound and against mergekit 0.1.5, in one run.

Builds synthetic Llama checkpoints (a bf16 base and fine-tune-like experts, cached under
benchmarks/.work/), measures the warm read bound, runs each method through amalgam and through
mergekit (installed here in its own venv) from the same mergekit YAML, each merge in a fresh
process (wall time and peak RSS of that process), and compares the outputs. See README.md.

    python benchmarks/speed.py                     # about 0.5B parameters, base + 3
    python benchmarks/speed.py --quick --skip-mergekit   # a smoke run, under a minute
    python benchmarks/speed.py --adapters          # 8 LoRA adapters: amalgam against PEFT
    python benchmarks/speed.py --align             # weight matching + merge of two models
    python benchmarks/speed.py --ray --skip-mergekit   # the Ray executor against local
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
MERGEKIT_VERSION = "0.1.5"
MERGEKIT_PINS = ("torch==2.13.0", f"mergekit=={MERGEKIT_VERSION}")
GENERATOR_VERSION = 1  # bump when the synthetic checkpoints change
SHARD_BYTES = 400 * 10**6
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
DETERMINISTIC = ("linear", "task_arithmetic", "ties")
# issue 18's targets: wall time against mergekit's, in-engine time against the read bound of
# the bytes a method reads, peak RSS for base + 3 and for base + 15 experts
TARGET_SPEEDUP = {"linear": 4, "task_arithmetic": 4, "ties": 15, "dare_ties": 15}
TARGET_ENGINE_X = {"linear": 1.5, "task_arithmetic": 1.5, "ties": 3.0, "dare_ties": 3.0}
TARGET_RSS = 1.5e9  # the align and adapter runs' bound
TARGET_RSS_BASE3, TARGET_RSS_15 = 1.0e9, 1.5e9
TABLE_START, TABLE_END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"


# -- synthetic checkpoints -------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-style decoder (GQA, untied head) of roughly a given parameter count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
            ]
        return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }


def llama_shape(target: float) -> LlamaShape:
    """Hidden size by scale, then as many layers as bring the count nearest ``target``."""
    hidden = 512 if target < 2e8 else 1024 if target < 1.5e9 else 2048
    heads = hidden // 64
    probe = LlamaShape(hidden, round(2.75 * hidden / 128) * 128, 1, heads, heads // 2)
    per_layer = probe.params - LlamaShape(hidden, probe.intermediate, 0, heads, heads // 2).params
    fixed = probe.params - per_layer
    layers = max(1, round((target - fixed) / per_layer))
    return LlamaShape(hidden, probe.intermediate, layers, heads, heads // 2)


def _seeded(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix(key))
    return g


def _mix(key: tuple[int, ...]) -> int:
    """A deterministic 63-bit seed from small integers (no dependence on Python's hash)."""
    x = 0x9E3779B97F4A7C15
    for k in key:
        x = ((x ^ (k + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    return x >> 1


def build_family(shape: LlamaShape, experts: int, work: Path) -> dict[str, Path]:
    """base + ``experts`` HF Llama folders (sharded safetensors), cached by their spec.

    Base weights ~ N(0, 0.02) (norm gains ~ 1); each expert adds its own N(0, 1e-3) delta plus
    a low-rank N(0, ...) direction, so experts agree a little, like fine-tunes of one base.
    """
    spec = {"shape": asdict(shape), "experts": experts, "version": GENERATOR_VERSION}
    root = work / f"llama-{shape.params / 1e6:.0f}M-{experts}x"
    labels = ["base"] + [f"expert{i + 1}" for i in range(experts)]
    paths = {label: root / label for label in labels}
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return paths
    if root.exists():
        shutil.rmtree(root)
    for p in paths.values():
        p.mkdir(parents=True)
        (p / "config.json").write_text(json.dumps(shape.config(), indent=2))
    started = time.perf_counter()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in labels]
    size, index, weight_map = 0, 0, {}
    files: list[str] = []

    def flush() -> None:
        nonlocal size, index
        name = f"model-{index + 1:05d}.safetensors"
        files.append(name)
        for label, shard in zip(labels, shards, strict=True):
            save_file(shard, str(paths[label] / name), metadata={"format": "pt"})
            shard.clear()
        size, index = 0, index + 1

    for t_index, (name, dims) in enumerate(shape.tensors()):
        nbytes = math.prod(dims) * 2
        if size and size + nbytes > SHARD_BYTES:
            flush()
        g = _seeded(0, t_index)
        if len(dims) == 1:
            base = 1.0 + 0.05 * torch.randn(dims, generator=g)
        else:
            base = 0.02 * torch.randn(dims, generator=g)
        shards[0][name] = base.to(torch.bfloat16)
        shared = 5e-4 * torch.randn(dims, generator=_seeded(1, t_index))  # common direction
        for e in range(1, len(labels)):
            delta = shared + 1e-3 * torch.randn(dims, generator=_seeded(2, e, t_index))
            shards[e][name] = (base + delta).to(torch.bfloat16)
            del delta
        del base, shared
        weight_map[name] = f"model-{index + 1:05d}.safetensors"
        size += nbytes
    flush()
    n = len(files)
    for label in labels:
        renamed = {}
        for i, old in enumerate(files):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (paths[label] / old).rename(paths[label] / new)
            renamed[old] = new
        index_json = {
            "metadata": {"total_size": shape.params * 2},
            "weight_map": {k: renamed[v] for k, v in weight_map.items()},
        }
        (paths[label] / "model.safetensors.index.json").write_text(json.dumps(index_json))
    marker.write_text(json.dumps(spec))
    print(f"built {len(labels)} checkpoints in {time.perf_counter() - started:.0f}s: {root}")
    return paths


# -- measurements ----------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def plain_read(folders: list[Path]) -> float:
    """Seconds to read every weight file once into a reused 16 MiB buffer (cat-style)."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    for folder in folders:
        for f in weight_files(folder):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    return time.perf_counter() - start


def amalgam_read(folders: list[Path]) -> tuple[float, int]:
    """Seconds and bytes to read every tensor once with amalgam's own checkpoint reader."""
    from amalgam.checkpoint import open_checkpoint

    total = 0
    start = time.perf_counter()
    for folder in folders:
        with open_checkpoint(str(folder)) as ckpt:
            for name in ckpt.names():
                total += ckpt.tensor(name).nbytes
    return time.perf_counter() - start, total


@dataclass
class ReadBound:
    bytes: int
    amalgam_s: float
    plain_s: float

    @property
    def gb_s(self) -> float:
        return self.bytes / 1e9 / self.amalgam_s

    def seconds_for(self, nbytes: int) -> float:
        return self.amalgam_s * nbytes / self.bytes


def read_bound(folders: list[Path], repeats: int = 2) -> ReadBound:
    plain_read(folders)  # warm the page cache
    plain = min(plain_read(folders) for _ in range(repeats))
    runs = [amalgam_read(folders) for _ in range(repeats)]
    return ReadBound(runs[0][1], min(s for s, _ in runs), plain)


@dataclass
class Run:
    wall_s: float
    peak_rss: int
    returncode: int
    output: str
    info: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = 0.0  # the process's user + system CPU seconds


# Peak RSS needs a small parent: on Linux a child's ru_maxrss starts from the RSS of the process
# that forked it (the kernel keeps the old address space's high-water mark across exec), and this
# script is large after building checkpoints. So a tiny launcher forks each measured process and
# reports that child's wall time and ru_maxrss from wait4.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as fh:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime,
               "returncode": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` in a fresh process; its wall time and its own peak RSS."""
    report = log.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    exe = shutil.which(cmd[0]) or cmd[0]
    with open(log, "wb") as out:
        subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(report), exe, *cmd[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            check=False,
        )
    text = log.read_text(errors="replace")
    if not report.exists():
        return Run(0.0, 0, -1, text[-2000:])
    usage = json.loads(report.read_text())
    info = {}
    for line in text.splitlines():
        if line.startswith(RESULT_LINE):
            info = json.loads(line.removeprefix(RESULT_LINE))
    rss = usage["maxrss_kb"] * 1024
    return Run(usage["wall_s"], rss, usage["returncode"], text[-2000:], info, usage["cpu_s"])


#: A measured child reports what it timed inside itself on one stdout line with this prefix.
RESULT_LINE = "BENCH_RESULT "
AMALGAM_CHILD = """
import json, sys, time
start = time.perf_counter()
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import load_recipe
from amalgam.storage import amalgam_home
recipe = load_recipe(sys.argv[1])
imported = time.perf_counter() - start
executor = sys.argv[3] if len(sys.argv) > 3 else "local"
ray_start = time.perf_counter()
if executor == "ray":  # a running cluster is what users merge on: its start is timed apart
    from amalgam.engine.ray_executor import ensure_ray
    ensure_ray(amalgam_home())
ray_start = time.perf_counter() - ray_start
options = MergeOptions(output=sys.argv[2], overwrite=True, device="cpu", executor=executor)
def rchar():
    return int(open("/proc/self/io").read().split("rchar:")[1].split()[0])
rchar_before, cpu_before = rchar(), time.process_time()
result = run_merge(recipe, options)
merge_cpu = time.process_time() - cpu_before
syscall_read = rchar() - rchar_before
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("BENCH_RESULT " + json.dumps({"merge_s": result.seconds, "input_bytes": result.input_bytes,
      "merge_cpu_s": merge_cpu,
      "syscall_read_bytes": syscall_read,
      "startup_s": imported, "vmhwm_bytes": int(status) * 1024, "ray_start_s": ray_start,
      "worker_peaks": list(result.worker_peaks)}))
"""


def run_amalgam(
    cfg: Path, out: Path, log: Path, executor: str = "local", home: Path | None = None
) -> Run:
    """One engine merge in a fresh process (``home``: its $AMALGAM_HOME, else the caller's)."""
    shutil.rmtree(out, ignore_errors=True)
    env = None if home is None else dict(os.environ, AMALGAM_HOME=str(home))
    cmd = [sys.executable, "-c", AMALGAM_CHILD, str(cfg), str(out), executor]
    return run_child(cmd, log, env)


HASH_CHILD = """
import sys
from amalgam.checkpoint import open_checkpoint
for folder in sys.argv[1:]:
    with open_checkpoint(folder) as ckpt:
        ckpt.content_hash()
"""


def warm_hashes(folders: list[Path], home: Path) -> float:
    """Hash every input into a fresh ``home``'s cache (as a first merge does); its seconds.
    Timed merges then find the hashes cached by file stamp, as every later merge does."""
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = dict(os.environ, AMALGAM_HOME=str(home))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", HASH_CHILD, *map(str, folders)], env=env, cwd=ROOT, check=True
    )
    return time.perf_counter() - start


#: ``amalgam merge`` as the console script runs it (``entry`` skips Python's teardown)
CLI_CHILD = (
    "import sys; sys.argv[0] = 'amalgam'; from amalgam_flows import cli; "
    "getattr(cli, 'entry', cli.main)()"
)
CLI_ENGINE_SECONDS = re.compile(r" read in ([0-9.]+) s ")


def run_cli(cfg: Path, out: Path, log: Path, home: Path) -> Run:
    """``amalgam merge CFG`` in a fresh process, process start to exit, with ``home`` as
    $AMALGAM_HOME; ``info["merge_s"]``: the engine time the command prints."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, AMALGAM_HOME=str(home), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", CLI_CHILD, "merge", str(cfg), "--output", str(out), "--overwrite"]
    run = run_child(cmd, log, env)
    shutil.rmtree(out, ignore_errors=True)
    match = CLI_ENGINE_SECONDS.search(log.read_text(errors="replace"))
    run.info["merge_s"] = float(match.group(1)) if match else None
    return run


def profile_amalgam(cfg: Path, out: Path, raw: Path, home: Path) -> tuple[str, float | None]:
    """Run one amalgam merge under py-spy (every thread, idle samples too, 100 Hz); the raw
    collapsed stacks go to ``raw``; returns them ("" if py-spy failed) and the in-engine s."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: pip install -e .[bench]")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [spy, "record", "--threads", "--idle", "-r", "100", "--format", "raw", "-o", str(raw)]
    cmd += ["--", sys.executable, "-c", AMALGAM_CHILD, str(cfg), str(out)]
    env = dict(os.environ, AMALGAM_HOME=str(home))  # the warmed hashes, as the timed runs
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    shutil.rmtree(out, ignore_errors=True)
    info = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_LINE)]
    merge_s = json.loads(info[-1].removeprefix(RESULT_LINE))["merge_s"] if info else None
    return (raw.read_text() if raw.exists() else ""), merge_s


#: profile groups: a sample's innermost frame that names one decides (see ``group_of``)
WAIT_FILES = ("threading.py", "queue.py", "concurrent/futures/")
SELECT_FNS = {"kth_largest", "kth_largest_rows", "top_bin", "trim_threshold", "band_mask"}
SELECT_FNS |= {"outlier_band"}
MASK_FNS = {"drop_random", "fit", "mask", "_mask"}
READ_FILES = {"amalgam/checkpoint.py", "amalgam/engine/inputs.py"}
WRITE_FILES = {"amalgam/writer.py", "amalgam/engine/write.py"}
GROUPS = ("read", "convert", "compute", "select", "random mask", "write", "wait", "other")
THREAD_FRAME = re.compile(r"thread \(\w+\)(?::\s*(.*))?$")
CONVERT_CODE = re.compile(r"\.(float|to|half|bfloat16)\(")


def _frame(text: str) -> tuple[str, str, int]:
    """(function, file, line) of one py-spy frame ``Class.fn (file:line)``; function without
    its class."""
    fn, _, where = text.partition(" (")
    file, _, line = where.rstrip(")").rpartition(":")
    return fn.rsplit(".", 1)[-1], file, int(line) if line.isdigit() else 0


def _source_line(file: str, line: int, cache: dict[tuple[str, int], str]) -> str:
    if (file, line) not in cache:
        path = ROOT / file
        lines = path.read_text().splitlines() if path.is_file() else []
        cache[(file, line)] = lines[line - 1] if 0 < line <= len(lines) else ""
    return cache[(file, line)]


def group_of(frames: list[tuple[str, str, int]], cache: dict[tuple[str, int], str]) -> str:
    """A sample's group: wait when the leaf blocks on a lock, queue or future; else, from the
    leaf outwards, the first frame that is a top-k selection, a random-mask draw, the writer,
    the checkpoint reader, or any other amalgam line (convert when it casts: .float(),
    .to(...); compute otherwise); other when no amalgam frame is on the stack (start-up)."""
    if not frames or any(w in frames[-1][1] for w in WAIT_FILES):
        return "wait"
    for fn, file, line in reversed(frames):
        if fn in SELECT_FNS:
            return "select"
        if fn in MASK_FNS or file.endswith("counter_random.py"):
            return "random mask"
        if file in WRITE_FILES:
            return "write"
        if file in READ_FILES:
            return "read"
        if file.startswith("amalgam/"):
            code = _source_line(file, line, cache)
            return "convert" if CONVERT_CODE.search(code) else "compute"
    return "other"


def samples(collapsed: str) -> Iterator[tuple[str, list[tuple[str, str, int]], int, str]]:
    """(thread, frames outermost first, count, the raw line) per py-spy collapsed-stack line."""
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = stack.split(";")
        named = THREAD_FRAME.match(parts[0])
        thread = re.sub(r"_\d+$", "", (named.group(1) or "unnamed").strip('"')) if named else "?"
        frames = [_frame(f) for f in parts if "(" in f and not f.startswith(("thread", "process"))]
        yield thread, frames, int(count), line


def group_profile(collapsed: str, hz: int = 100) -> dict[str, dict[str, float]]:
    """Thread-seconds per thread and group from py-spy's raw collapsed stacks."""
    table: dict[str, dict[str, float]] = {}
    cache: dict[tuple[str, int], str] = {}
    for thread, frames, count, _ in samples(collapsed):
        row = table.setdefault(thread, dict.fromkeys(GROUPS, 0.0))
        row[group_of(frames, cache)] += count / hz
    return table


def busy(collapsed: str) -> str:
    """The collapsed stacks without the samples of waiting threads."""
    cache: dict[tuple[str, int], str] = {}
    return "\n".join(ln for _, fr, _, ln in samples(collapsed) if group_of(fr, cache) != "wait")


def profile_markdown(method: str, grouped: dict[str, dict[str, float]], merge_s: float) -> str:
    """One method's table: thread-seconds per thread and group, with a total row."""
    lines = [
        f"### {method} (in-engine {merge_s:.2f} s in the profiled run)",
        "",
        "| thread | " + " | ".join(GROUPS) + " | total |",
        "|---|" + "---:|" * (len(GROUPS) + 1),
    ]
    total = dict.fromkeys(GROUPS, 0.0)
    for thread, row in sorted(grouped.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(
            f"| {thread} | "
            + " | ".join(f"{row[g]:.1f}" for g in GROUPS)
            + f" | {sum(row.values()):.1f} |"
        )
        for g in GROUPS:
            total[g] += row[g]
    lines.append(
        "| all threads | "
        + " | ".join(f"{total[g]:.1f}" for g in GROUPS)
        + f" | {sum(total.values()):.1f} |"
    )
    return "\n".join(lines) + "\n"


def summarize_stacks(collapsed: str, top: int) -> str:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] + ")" if ".py:" in f else f for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0) + n
    lines = [f"{total} samples (100 Hz, every thread)", "", "inclusive:"]
    for f, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {n / max(total, 1):6.1%}  {f}")
    lines += ["", "self (line level):"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {n / max(total, 1):6.1%}  {f}")
    return "\n".join(lines) + "\n"


def ensure_mergekit(work: Path) -> Path:
    """A venv with mergekit 0.1.5 and the project's torch pin; returns mergekit-yaml."""
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    pip = venv / "bin" / "pip"
    if exe.exists():
        shown = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True)
        if f"Version: {MERGEKIT_VERSION}" in shown.stdout:
            return exe
    print(f"installing {' '.join(MERGEKIT_PINS)} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(pip), "install", "--quiet", *MERGEKIT_PINS], check=True)
    subprocess.run([str(pip), "check"], check=True)
    return exe


def mergekit_startup(exe: Path, log: Path) -> float:
    """Seconds for ``mergekit-yaml --help``: start-up and imports, no merge."""
    return min(run_child([str(exe), "--help"], log).wall_s for _ in range(2))


def run_mergekit(exe: Path, cfg: Path, out: Path, log: Path) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [str(exe), str(cfg), str(out), "--lazy-unpickle", "--no-write-model-card", "--quiet"]
    return run_child(cmd, log, env)


# -- configs and output comparison -----------------------------------------------------------


def mergekit_config(method: str, paths: dict[str, Path], compute_dtype: str) -> dict[str, Any]:
    """The one mergekit YAML both tools run (amalgam through amalgam.mergekit_compat)."""
    experts = [str(p) for label, p in paths.items() if label != "base"]
    cfg: dict[str, Any] = {"merge_method": method}
    if method == "linear":
        cfg["models"] = [{"model": e, "parameters": {"weight": 1.0}} for e in experts]
    else:
        cfg["base_model"] = str(paths["base"])
        params = {"weight": 0.5} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
        cfg["models"] = [{"model": e, "parameters": dict(params)} for e in experts]
    cfg["dtype"] = compute_dtype  # mergekit's compute dtype; amalgam always computes in float32
    cfg["out_dtype"] = "bfloat16"
    return cfg


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (the spacing of bf16 numbers there; subnormal spacing at 0)."""
    _, exp = torch.frexp(x.abs().float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (exp - 8).clamp(min=-133))


def _tensors(folder: Path):
    for f in weight_files(folder):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, fh.get_tensor(name)


def compare(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """max |a - b| and the fraction of elements more than one bf16 ulp apart."""
    b = dict(_tensors(b_dir))
    worst, over, total, missing = 0.0, 0, 0, []
    for name, x in _tensors(a_dir):
        y = b.pop(name, None)
        if y is None:
            missing.append(name)
            continue
        x, y = x.float(), y.float()
        diff = (x - y).abs()
        worst = max(worst, diff.max().item())
        over += int((diff > _bf16_ulp(torch.maximum(x.abs(), y.abs()))).sum())
        total += x.numel()
    return {
        "max_abs_diff": worst,
        "frac_over_1ulp": over / max(total, 1),
        "elements": total,
        "only_in_amalgam": missing,
        "only_in_mergekit": sorted(b),
    }


def delta_stats(out: Path, base: Path) -> dict[str, float]:
    """How far a merge moved from the base: mean |out - base|, and the fraction that moved."""
    ref = dict(_tensors(base))
    moved, total, abs_sum = 0, 0, 0.0
    for name, x in _tensors(out):
        d = x.float() - ref[name].float()
        moved += int((d != 0).sum())
        abs_sum += d.abs().sum().item()
        total += d.numel()
    return {"mean_abs_delta": abs_sum / total, "frac_moved": moved / total}


# -- report ----------------------------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    rb = result["read_bound"]
    lines = [
        f"Synthetic Llama, {result['params'] / 1e6:.0f}M parameters, bf16, base + "
        f"{result['experts']} ({result['shape']['layers']} layers, hidden "
        f"{result['shape']['hidden']}); CPU: {result['cpu']}; {result['machine']}; "
        f"{source_line(result['amalgam'])}.",
        "",
        f"Read bound (warm page cache, all {result['models']} checkpoints, "
        f"{rb['bytes'] / 1e9:.2f} GB): amalgam reader {rb['amalgam_s']:.2f} s "
        f"({rb['gb_s']:.2f} GB/s); plain file reads {rb['plain_s']:.2f} s "
        f"({rb['bytes'] / 1e9 / rb['plain_s']:.2f} GB/s). Content hashes of all inputs, cold "
        f"(a first merge's): {result['hash_s']:.2f} s; every timed run below finds them cached.",
        "",
        "| method | GB read | syscall GB | read bound s | in-engine s | in-engine × read bound "
        "| in-engine CPU s (cores busy) "
        "| amalgam wall s | `amalgam merge` wall s | peak RSS GB "
        "| mergekit wall s | mergekit peak RSS GB | speedup | speedup, merge only "
        "| max abs diff | frac > 1 ulp |",
        "|---|" + "---:|" * 15,
    ]
    for row in result["rows"]:
        cmp_ = row.get("compare") or {}
        lines.append(
            f"| {row['method']} | {row['input_bytes'] / 1e9:.2f} "
            f"| {(row.get('syscall_read_bytes') or 0) / 1e9:.2f} | {row['read_bound_s']:.2f} "
            f"| {fmt(row.get('merge_s'), '.2f')} | {row['engine_x_read_bound']:.1f} "
            f"| {cpu_busy(row)} "
            f"| {row['amalgam_wall_s']:.2f} | {fmt(row.get('cli_wall_s'), '.2f')} "
            f"| {row['amalgam_rss'] / 1e9:.2f} "
            f"| {fmt(row.get('mergekit_wall_s'), '.1f')} "
            f"| {fmt((row.get('mergekit_rss') or 0) / 1e9 or None, '.2f')} "
            f"| {fmt(row.get('speedup'), '.1f')} | {fmt(row.get('speedup_merge_only'), '.1f')} "
            f"| {fmt(cmp_.get('max_abs_diff'), '.3g')} | {fmt(cmp_.get('frac_over_1ulp'), '.2e')} |"
        )
    lines += ["", "Targets:"]
    lines += [f"- {t}" for t in result["targets"]]
    for row in result["rows"]:
        if "dare_stats" in row:
            s = row["dare_stats"]
            lines.append(
                f"- dare_ties (random masks differ, so no equality): mean |out - base| "
                f"amalgam {s['amalgam']['mean_abs_delta']:.3e} vs mergekit "
                f"{s['mergekit']['mean_abs_delta']:.3e}; fraction moved from base "
                f"{s['amalgam']['frac_moved']:.3f} vs {s['mergekit']['frac_moved']:.3f}"
            )
    lines += [
        "",
        "GB read: the bytes of the method's inputs (linear reads the experts, the others the "
        "base too), each once; read bound s: the amalgam reader's warm time for those bytes "
        "(the bound whatever the merge reads twice); syscall GB: what the merge process read "
        "through read/pread calls during run_merge (/proc/self/io rchar: more than GB read when "
        "inputs are read twice, less when they are mapped). "
        "in-engine s: amalgam's run_merge alone; in-engine CPU s: the CPU seconds of all its "
        "threads meanwhile (process_time), and that over in-engine s: how many cores were busy "
        f"on average (of {os.cpu_count()}); "
        "amalgam wall s: that whole process (start-up and imports included); `amalgam merge` "
        "wall s: the command a user runs, process start to exit. speedup: mergekit wall s / "
        "amalgam wall s; merge only: (mergekit wall s - its start-up, "
        f"{fmt(result['mergekit_startup_s'], '.1f')} s for `mergekit-yaml --help`) / amalgam "
        "in-engine s. max abs diff and frac > 1 ulp: amalgam's output against "
        f"mergekit's (mergekit computing in {result['mergekit_dtype']}).",
    ]
    return "\n".join(lines) + "\n"


def cpu_busy(row: dict[str, Any]) -> str:
    """In-engine CPU seconds and the cores they kept busy on average."""
    cpu, merge = row.get("merge_cpu_s"), row.get("merge_s")
    return "n/a" if cpu is None or not merge else f"{cpu:.2f} ({cpu / merge:.2f})"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        m = row["method"]
        rss_ok = row["amalgam_rss"] <= TARGET_RSS_BASE3
        line = (
            f"{m}: peak RSS {row['amalgam_rss'] / 1e9:.2f} GB {'<=' if rss_ok else '>'} "
            f"{TARGET_RSS_BASE3 / 1e9:.1f} GB"
        )
        x, want_x = row["engine_x_read_bound"], TARGET_ENGINE_X[m]
        line += f"; in-engine {x:.1f}x read bound {'<=' if x <= want_x else '>'} {want_x}x"
        if row.get("speedup") is not None:
            want = TARGET_SPEEDUP[m]
            ok = row["speedup"] >= want
            line += f"; speedup {row['speedup']:.1f}x {'>=' if ok else '<'} {want}x"
            merge_only = row["speedup_merge_only"]
            line += f" (merge only {merge_only:.1f}x {'>=' if merge_only >= want else '<'} {want}x)"
        cmp_ = row.get("compare")
        if cmp_ is not None:
            ok = cmp_["frac_over_1ulp"] == 0
            line += f"; outputs {'within' if ok else 'NOT within'} one bf16 ulp of mergekit's"
        out.append(line)
    return out


def update_readme(table: str) -> None:
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        return
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(f"{head}{TABLE_START}\n{table}{TABLE_END}{tail}")


def source_state() -> dict[str, Any]:
    """The amalgam commit measured, and any uncommitted changes to tracked files."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--short", "--untracked-files=no").splitlines(),
    }


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it (/proc/cpuinfo's ``model name``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}"


# -- LoRA adapters: amalgam's dense path against PEFT ----------------------------------------

ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_VERSION = 1  # bump when the synthetic adapters change


def build_adapters(base: Path, count: int, rank: int) -> list[Path]:
    """``count`` PEFT LoRA folders over ``base`` (r=``rank``, alpha 2r, every attention and MLP
    projection), written by PEFT's own ``save_pretrained``; cached next to the base by spec.

    A ~ N(0, 0.01) and B ~ N(0, 0.0125), seeded per adapter and tensor, so each adapter's
    delta (2 x B @ A) has entries of about 1e-3, like the experts of ``build_family``.
    """
    spec = {
        "rank": rank,
        "count": count,
        "targets": list(ADAPTER_TARGETS),
        "version": ADAPTER_VERSION,
    }
    root = base.parent / f"adapters-r{rank}-{count}x"
    folders = [root / f"adapter{i + 1}" for i in range(count)]
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folders
    shutil.rmtree(root, ignore_errors=True)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ADAPTER_TARGETS))
    model = get_peft_model(model, config)
    lora = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
    for i, folder in enumerate(folders):
        with torch.no_grad():
            for t_index, (name, param) in enumerate(lora):
                std = 0.01 if ".lora_A." in name else 0.0125
                param.copy_(std * torch.randn(param.shape, generator=_seeded(3, i, t_index)))
        model.save_pretrained(folder)
    del model, lora
    marker.write_text(json.dumps(spec))
    print(f"built {count} adapters in {time.perf_counter() - started:.0f}s: {root}", flush=True)
    return folders


def adapter_recipe(base: Path, adapters: list[Path], weight: float) -> dict[str, Any]:
    """task_arithmetic over the adapters, each listed as a model over the recipe's base."""
    return {
        "method": "task_arithmetic",
        "base": str(base),
        "models": [{"uri": str(a)} for a in adapters],
        "params": {"lambda": weight},
        "dtype": "bfloat16",
    }


# PEFT's way to the same model: cat keeps every adapter's B @ A exactly (PEFT's linear mixes the
# A and B factors separately, which is not task arithmetic), each scaled by weight x alpha/r.
PEFT_CHILD = """
import json, sys, time
start = time.perf_counter()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, out, weight, adapters = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
imported = time.perf_counter() - start
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
names = [f"a{i}" for i in range(len(adapters))]
model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
for name, folder in zip(names[1:], adapters[1:]):
    model.load_adapter(folder, adapter_name=name)
model.add_weighted_adapter(names, [weight] * len(names), "merged", combination_type="cat")
model.set_adapter("merged")
model.merge_and_unload().save_pretrained(out)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("BENCH_RESULT " + json.dumps({"merge_s": time.perf_counter() - start - imported,
      "startup_s": imported, "vmhwm_bytes": int(status) * 1024}))
"""


def _lora_factors(adapters: list[Path]) -> dict[str, list[tuple[float, Path, str]]]:
    """Per base tensor name, each adapter's (alpha/r, adapter file, lora_A key)."""
    factors: dict[str, list[tuple[float, Path, str]]] = {}
    for folder in adapters:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        file = folder / "adapter_model.safetensors"
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if ".lora_A." in key:
                    name = key.removeprefix("base_model.model.").replace(".lora_A", "")
                    factors.setdefault(name, []).append((cfg["lora_alpha"] / cfg["r"], file, key))
    return factors


def _delta(scale: float, file: Path, a_key: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as fh:
        a, b = fh.get_tensor(a_key), fh.get_tensor(a_key.replace(".lora_A.", ".lora_B."))
    return scale * (b.float() @ a.float())


def _index(folder: Path) -> dict[str, Path]:
    """Which weight file of ``folder`` holds each tensor."""
    index = {}
    for f in weight_files(folder):
        with safe_open(str(f), "pt") as fh:
            index |= dict.fromkeys(fh.keys(), f)
    return index


def _tensor(index: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(index[name]), "pt") as fh:
        return fh.get_tensor(name)


def reference_gaps(
    base: Path, adapters: list[Path], weight: float, outs: dict[str, Path]
) -> dict[str, float]:
    """max |output - reference| per output, against two references computed here one tensor
    at a time: ``exact``, bf16(W0 + weight x sum of deltas), and ``rounded``, the same sum over
    each adapter's dense model rounded to bf16 first (what merge_and_unload of each adapter,
    then task arithmetic, gives)."""
    factors = _lora_factors(adapters)
    gaps = {f"{out}_vs_{ref}": 0.0 for out in outs for ref in ("exact", "rounded")}
    indexes = {label: _index(folder) for label, folder in outs.items()}
    for name, w0 in _tensors(base):
        w0 = w0.float()
        exact, rounded = torch.zeros_like(w0), torch.zeros_like(w0)
        for factor in factors.get(name, []):
            d = _delta(*factor)
            exact += d
            rounded += (w0 + d).bfloat16().float() - w0
            del d
        refs = {"exact": w0 + weight * exact, "rounded": w0 + weight * rounded}
        for label, index in indexes.items():
            got = _tensor(index, name).float()
            for ref, value in refs.items():
                gap = (got - value.bfloat16().float()).abs().max().item()
                gaps[f"{label}_vs_{ref}"] = max(gaps[f"{label}_vs_{ref}"], gap)
    return gaps


def run_adapters(args: argparse.Namespace, params: float) -> int:
    """Merge ``--adapters`` LoRAs with task_arithmetic through amalgam and through PEFT, each
    in a fresh process; wall time, peak RSS and the largest difference between the outputs."""
    shape = llama_shape(params)
    base = build_family(shape, 0, args.work)["base"]
    adapters = build_adapters(base, args.adapters, args.rank)
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    weight = 0.5
    cfg_path = runs / "adapters-task_arithmetic.yml"
    cfg_path.write_text(yaml.safe_dump(adapter_recipe(base, adapters, weight), sort_keys=False))
    am_out, peft_out = runs / "adapters-amalgam", runs / "adapters-peft"
    state = source_state()
    am = run_amalgam(cfg_path, am_out, runs / "adapters-amalgam.log")
    if am.returncode:
        raise SystemExit(f"amalgam adapter merge failed:\n{am.output}")
    print(f"amalgam: {am.wall_s:.2f}s, {am.peak_rss / 1e9:.2f} GB", flush=True)
    shutil.rmtree(peft_out, ignore_errors=True)
    cmd = [sys.executable, "-c", PEFT_CHILD, str(base), str(peft_out), str(weight)]
    pf = run_child([*cmd, *map(str, adapters)], runs / "adapters-peft.log")
    if pf.returncode:
        raise SystemExit(f"PEFT adapter merge failed:\n{pf.output}")
    print(f"PEFT: {pf.wall_s:.2f}s, {pf.peak_rss / 1e9:.2f} GB", flush=True)
    agreement = compare(am_out, peft_out)
    gaps = reference_gaps(base, adapters, weight, {"amalgam": am_out, "peft": peft_out})
    shutil.rmtree(am_out, ignore_errors=True)
    shutil.rmtree(peft_out, ignore_errors=True)
    adapter_bytes = sum(f.stat().st_size for a in adapters for f in weight_files(a))
    result = {
        "params": shape.params,
        "shape": asdict(shape),
        "adapters": args.adapters,
        "rank": args.rank,
        "targets": ADAPTER_TARGETS,
        "weight": weight,
        "base_bytes": sum(f.stat().st_size for f in weight_files(base)),
        "adapter_bytes": adapter_bytes,
        "machine": machine(),
        "amalgam_source": state,
        "amalgam": {"wall_s": am.wall_s, "peak_rss": am.peak_rss, **am.info},
        "peft": {"wall_s": pf.wall_s, "peak_rss": pf.peak_rss, **pf.info},
        "compare": agreement,
        "reference_gaps": gaps,
    }
    write_results(
        f"speed-adapters{'-quick' if args.quick else ''}", result, adapters_markdown(result)
    )
    return 0


def write_results(stem: str, result: dict[str, Any], table: str) -> None:
    """``result`` as ``results/<stem>.json`` and its ``table`` as ``results/<stem>.md``,
    printed too."""
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


def adapters_markdown(result: dict[str, Any]) -> str:
    am, pf, cmp_ = result["amalgam"], result["peft"], result["compare"]
    gaps, shape, rank = result["reference_gaps"], result["shape"], result["rank"]
    rss_ok = am["peak_rss"] <= TARGET_RSS
    missing = cmp_["only_in_amalgam"] + cmp_["only_in_mergekit"]
    lines = [
        f"{result['adapters']} LoRA adapters (r={rank}, alpha {2 * rank}, "
        f"{', '.join(result['targets'])}; {result['adapter_bytes'] / 1e6:.0f} MB in all) over a "
        f"synthetic bf16 Llama of {result['params'] / 1e6:.0f}M parameters ({shape['layers']} "
        f"layers, hidden {shape['hidden']}, {result['base_bytes'] / 1e6:.0f} MB), merged into a "
        f"dense bf16 model with task_arithmetic (lambda {result['weight']}); "
        f"{result['machine']}; amalgam {result['amalgam_source']['commit']}.",
        "",
        "| merge | wall s | merge s | peak RSS GB |",
        "|---|---:|---:|---:|",
    ]
    for tool, r in (("amalgam (`run_merge`)", am), ("PEFT (cat + merge_and_unload)", pf)):
        lines.append(
            f"| {tool} | {r['wall_s']:.1f} | {r['merge_s']:.1f} | {r['peak_rss'] / 1e9:.2f} |"
        )
    lines += [
        "",
        f"PEFT / amalgam: wall time {pf['wall_s'] / am['wall_s']:.1f}x, peak RSS "
        f"{pf['peak_rss'] / am['peak_rss']:.1f}x. Target: amalgam's peak RSS "
        f"{am['peak_rss'] / 1e9:.2f} GB {'<=' if rss_ok else '>'} 1.5 GB.",
        f"Outputs: max |amalgam - PEFT| over every tensor (float32) {cmp_['max_abs_diff']:.3g}; "
        f"{cmp_['frac_over_1ulp']:.2e} of {cmp_['elements']} elements more than one bf16 ulp "
        f"apart; tensors in one output only: {', '.join(missing) or 'none'}.",
        f"Against references computed here: max |amalgam - rounded| "
        f"{gaps['amalgam_vs_rounded']:.3g}, |amalgam - exact| {gaps['amalgam_vs_exact']:.3g}; "
        f"|PEFT - exact| {gaps['peft_vs_exact']:.3g}, |PEFT - rounded| "
        f"{gaps['peft_vs_rounded']:.3g}.",
        "",
        "*exact*: bf16(W0 + lambda x sum of alpha/r x B @ A), in float32. *rounded*: the same "
        "with each adapter's dense model rounded to bf16 first, which is merge_and_unload of "
        "each adapter, then task arithmetic. amalgam materialises each adapter as "
        "merge_and_unload does (rounded to the base's dtype); PEFT's cat sums the exact "
        "products; the two outputs differ by that rounding. wall s: the whole process as a "
        "user sees it (start-up, imports, reads and writes). merge s: amalgam's run_merge "
        "alone; for PEFT, loading the base and the adapters, add_weighted_adapter, "
        "merge_and_unload and save_pretrained (imports excluded). Peak RSS: the process's own "
        "ru_maxrss.",
    ]
    return "\n".join(lines) + "\n"


# -- permutation alignment: align + merge against the plain merge -----------------------------

ALIGN_CHILD = """
import json, sys, time
start = time.perf_counter()
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import load_recipe
from amalgam.stages.align import aligned_options
recipe = load_recipe(sys.argv[1])
imported = time.perf_counter() - start
options = MergeOptions(output=sys.argv[2], overwrite=True, device="cpu")
aligned = time.perf_counter()
options = aligned_options(recipe, options)
aligned = time.perf_counter() - aligned
result = run_merge(recipe, options)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("BENCH_RESULT " + json.dumps({"merge_s": result.seconds, "align_s": aligned,
      "input_bytes": result.input_bytes, "startup_s": imported,
      "vmhwm_bytes": int(status) * 1024}))
"""


def permuted_expert(expert: Path, seed: int) -> Path:
    """A copy of ``expert`` with every hidden unit group randomly permuted (cached)."""
    # lazy: the library, imported only by this benchmark's --align part
    from amalgam.align.permutation.apply import permuted_copy

    out = expert.with_name(f"{expert.name}-permuted-{seed}")
    if not (out / "amalgam-commit.json").is_file():
        permuted_copy(str(expert), str(out), seed=seed)
    return out


def run_align(args: argparse.Namespace, params: float) -> int:
    """Linear merge of the base with a permuted expert after weight matching, against the
    plain linear merge of the base with the unpermuted expert, each in a fresh process (wall
    time, peak RSS); the two outputs must agree (the matching undoes the permutation)."""
    shape = llama_shape(params)
    paths = build_family(shape, 1, args.work)
    permuted = permuted_expert(paths["expert1"], seed=7)
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    home = runs / "align-home"  # a fresh AMALGAM_HOME: the search runs, nothing is reused
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "AMALGAM_HOME": str(home)}
    state = source_state()
    results = {}
    for name, other, align in (
        ("plain", paths["expert1"], None),
        ("weight_matching", permuted, {"method": "weight_matching"}),
    ):
        recipe = {
            "models": [{"uri": str(paths["base"])}, {"uri": str(other)}],
            "method": "linear",
            "dtype": "bfloat16",
        }
        if align:
            recipe["align"] = align
        cfg = runs / f"align-{name}.yml"
        cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = runs / f"align-{name}"
        shutil.rmtree(out, ignore_errors=True)
        child = ALIGN_CHILD if align else AMALGAM_CHILD
        run = run_child(
            [sys.executable, "-c", child, str(cfg), str(out)], out.with_suffix(".log"), env
        )
        if run.returncode:
            raise SystemExit(f"amalgam {name} failed:\n{run.output}")
        results[name] = {"wall_s": run.wall_s, "peak_rss": run.peak_rss, **run.info}
        print(f"{name}: {run.wall_s:.1f}s, {run.peak_rss / 1e9:.2f} GB", flush=True)
    agreement = compare(runs / "align-weight_matching", runs / "align-plain")
    result = {
        "params": shape.params,
        "shape": asdict(shape),
        "machine": machine(),
        "amalgam_source": state,
        "runs": results,
        "compare": agreement,
        "search": search_report(home),
    }
    write_results(f"speed-align{'-quick' if args.quick else ''}", result, align_markdown(result))
    return 0


def search_report(home: Path) -> dict[str, Any]:
    """The aligner's own report (search time per model) from its work folder."""
    found = sorted(home.glob("cache/aligned/*/permutations/search.json"))
    return json.loads(found[0].read_text()) if found else {}


def align_markdown(result: dict[str, Any]) -> str:
    plain, wm, cmp_ = result["runs"]["plain"], result["runs"]["weight_matching"], result["compare"]
    shape = result["shape"]
    lines = [
        f"Two synthetic bf16 Llamas of {result['params'] / 1e6:.0f}M parameters "
        f"({shape['layers']} layers, hidden {shape['hidden']}); {result['machine']}; amalgam "
        f"{result['amalgam_source']['commit']}.",
        "",
        "| run | wall s | align s | merge s | peak RSS GB |",
        "|---|---:|---:|---:|---:|",
        f"| plain linear merge (base + expert) | {plain['wall_s']:.1f} | - | "
        f"{plain['merge_s']:.1f} | {plain['peak_rss'] / 1e9:.2f} |",
        f"| weight matching + linear merge (base + permuted expert) | {wm['wall_s']:.1f} | "
        f"{wm['align_s']:.1f} | {wm['merge_s']:.1f} | {wm['peak_rss'] / 1e9:.2f} |",
        "",
        f"Target: peak RSS under 2 GB: {wm['peak_rss'] / 1e9:.2f} GB. Outputs: max |aligned - "
        f"plain| {cmp_['max_abs_diff']:.3g} over {cmp_['elements']} elements (weight matching "
        "undid the permutation when this is 0).",
        "",
        "align s: the fetch and align stages (hashing, the permutation search, writing the "
        "aligned copy). Search report: " + json.dumps(result["search"]),
    ]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------


# -- --ray: the Ray executor on this one machine against the local executor ----------------


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of an output folder."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def run_ray(args: argparse.Namespace, params: float, methods: list[str]) -> int:
    """Each method on the local executor and on Ray (a local Ray on this machine, one task per
    part of --unit-size inputs), in the same run: in-engine time, peak memory of the driver
    and of every worker, and whether the outputs are the same bytes."""
    shape = llama_shape(params)
    paths = build_family(shape, args.experts, args.work)
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    rows = []
    for method in methods:
        cfg_path = runs / f"{method}-ray.yml"
        cfg_path.write_text(yaml.safe_dump(mergekit_config(method, paths, "float32")))
        measured, outputs = {}, {}
        for executor in ("local", "ray"):
            out = runs / f"{method}-{executor}"
            run = run_amalgam(cfg_path, out, runs / f"{method}-{executor}.log", executor)
            if run.returncode:
                raise SystemExit(f"amalgam {method} on {executor} failed:\n{run.output}")
            measured[executor], outputs[executor] = run, digests(out)
            shutil.rmtree(out, ignore_errors=True)
        local, ray = measured["local"], measured["ray"]
        peaks = ray.info["worker_peaks"]
        rows.append(
            {
                "method": method,
                "local_s": local.info["merge_s"],
                "ray_s": ray.info["merge_s"],
                "ratio": ray.info["merge_s"] / local.info["merge_s"],
                "ray_start_s": ray.info["ray_start_s"],
                "local_rss": local.peak_rss,
                "driver_rss": ray.peak_rss,
                "worker_max_rss": max(peaks),
                "worker_sum_rss": sum(peaks),
                "workers": len(peaks),
                "identical": outputs["local"] == outputs["ray"],
            }
        )
        print(rows[-1], flush=True)
    result = {
        "params": shape.params,
        "experts": args.experts,
        "unit_size": "256 MiB (default)",
        "machine": machine(),
        "amalgam": source_state(),
        "rows": rows,
    }
    write_results("speed-ray-quick" if args.quick else "speed-ray", result, ray_markdown(result))
    return 0


def ray_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Synthetic Llama, {result['params'] / 1e6:.0f}M parameters, bf16, base + "
        f"{result['experts']}; {result['machine']}; amalgam {result['amalgam']['commit']}"
        f"{' + local changes' if result['amalgam']['dirty'] else ''}. Ray: a local Ray on "
        f"this machine, a task per part of {result['unit_size']} of inputs.",
        "",
        "| method | local s | Ray s | Ray / local | Ray start s | local peak RSS GB "
        "| Ray driver peak GB | largest worker peak GB | workers | workers together GB "
        "| same bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['local_s']:.2f} | {r['ray_s']:.2f} | {r['ratio']:.2f} "
            f"| {r['ray_start_s']:.1f} | {r['local_rss'] / 1e9:.2f} | {r['driver_rss'] / 1e9:.2f} "
            f"| {r['worker_max_rss'] / 1e9:.2f} | {r['workers']} "
            f"| {r['worker_sum_rss'] / 1e9:.2f} | {r['identical']} |"
        )
    lines += [
        "",
        "local s, Ray s: amalgam's run_merge alone (in-engine), each in a fresh process; the "
        "Ray run connects to a Ray started before the merge (Ray start s), as a merge on a "
        "running cluster does. Peak RSS: the driver process's own; each Ray worker reports "
        "its process's peak, and 'together' is their sum (an upper bound of what they held "
        "at once).",
    ]
    return "\n".join(lines) + "\n"


def amalgam_row(method: str, am: Run, rb: ReadBound) -> dict[str, Any]:
    """One amalgam run against the read bound of the bytes it reads (each input once)."""
    nbytes = am.info["input_bytes"]
    bound = rb.seconds_for(nbytes)
    return {
        "method": method,
        "amalgam_wall_s": am.wall_s,
        "merge_s": am.info.get("merge_s"),
        "merge_cpu_s": am.info.get("merge_cpu_s"),
        "startup_s": am.info.get("startup_s"),
        "input_bytes": nbytes,
        "syscall_read_bytes": am.info.get("syscall_read_bytes"),
        "read_bound_s": bound,
        "gb_s": nbytes / 1e9 / am.wall_s,
        "x_read_bound": am.wall_s / bound,
        "engine_x_read_bound": am.info["merge_s"] / bound,
        "amalgam_rss": am.peak_rss,
        "amalgam_vmhwm": am.info.get("vmhwm_bytes"),
    }


def run_folder(work: Path) -> Path:
    """This run's configs, logs and outputs: a folder of its own, so runs sharing ``work``
    (and its cached checkpoints) do not clash."""
    folder = work / "runs" / f"pid{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_sweep(
    args: argparse.Namespace, shape: LlamaShape, counts: list[int], methods: list[str]
) -> int:
    """amalgam alone on base + the first N experts of one family, for each N in ``counts``."""
    family = build_family(shape, max(counts), args.work)
    runs = run_folder(args.work)
    rb = read_bound(list(family.values()))
    home = runs / "home"
    warm_hashes(list(family.values()), home)
    rows = []
    for n in counts:
        paths = {label: p for i, (label, p) in enumerate(family.items()) if i <= n}
        for method in methods:
            cfg_path = runs / f"sweep-{method}-{n}.yml"
            cfg = mergekit_config(method, paths, args.mergekit_dtype)
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            log = runs / f"sweep-{method}-{n}.log"
            am = run_amalgam(cfg_path, runs / "sweep-out", log, home=home)
            if am.returncode:
                raise SystemExit(f"amalgam {method} with {n} experts failed:\n{am.output}")
            rows.append({"experts": n, **amalgam_row(method, am, rb)})
            print(
                f"{method} x{n}: {am.info['merge_s']:.2f}s, {am.peak_rss / 1e9:.2f} GB", flush=True
            )
        shutil.rmtree(runs / "sweep-out", ignore_errors=True)
    result = {
        "params": shape.params,
        "shape": asdict(shape),
        "counts": counts,
        "machine": machine(),
        "cpu": cpu_model(),
        "amalgam": source_state(),
        "read_bound": {**asdict(rb), "gb_s": rb.gb_s},
        "rows": rows,
    }
    write_results(args.results or "speed-sweep", result, sweep_markdown(result))
    return 0


def sweep_markdown(result: dict[str, Any]) -> str:
    """One table: a row per method, a column pair (in-engine s, peak RSS GB) per expert count."""
    counts, rb = result["counts"], result["read_bound"]
    cells = {(r["method"], r["experts"]): r for r in result["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    lines = [
        f"Experts sweep: synthetic Llama, {result['params'] / 1e6:.0f}M parameters per model, "
        f"bf16, base + N experts; CPU: {result['cpu']}; {result['machine']}; "
        f"{source_line(result['amalgam'])}.",
        "",
        f"Read bound (warm page cache, amalgam reader): {rb['gb_s']:.2f} GB/s over "
        f"{rb['bytes'] / 1e9:.2f} GB.",
        "",
        "| method | "
        + " | ".join(f"N={n}: in-engine s (× read bound) | N={n}: peak RSS GB" for n in counts)
        + " |",
        "|---|" + "---:|---:|" * len(counts),
    ]
    for m in methods:
        row = []
        for n in counts:
            c = cells.get((m, n))
            row += (
                ["n/a", "n/a"]
                if c is None
                else [
                    f"{c['merge_s']:.2f} ({c['engine_x_read_bound']:.1f}x)",
                    f"{c['amalgam_rss'] / 1e9:.2f}",
                ]
            )
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Each merge in a fresh process (peak RSS: that process's); × read bound: in-engine s / "
        "the amalgam reader's warm time for the same input bytes. Targets (issue 18): base + 3 "
        f"at most {TARGET_RSS_BASE3 / 1e9:.1f} GB, base + 15 at most {TARGET_RSS_15 / 1e9:.1f} GB.",
    ]
    return "\n".join(lines) + "\n"


def source_line(state: dict[str, Any]) -> str:
    dirty = state["dirty"]
    return f"amalgam {state['commit']}, " + (
        f"tree with local changes ({len(dirty)} files)" if dirty else "clean tree"
    )


def write_profile(
    result: dict[str, Any], profiles: list[tuple[str, str, float | None]], quick: bool
) -> None:
    """benchmarks/results/speed-profile.md: thread-seconds per group and the hottest lines."""
    parts = [
        "# Where amalgam's in-engine time goes (py-spy)",
        "",
        f"`python benchmarks/speed.py {' '.join(result['argv'])}`, {result['date']}; "
        f"{result['params'] / 1e6:.0f}M parameters, base + {result['experts']}; "
        f"CPU: {result['cpu']}; {result['machine']}; {source_line(result['amalgam'])}.",
        "",
        "Each merge runs once more under `py-spy record --threads --idle -r 100`; figures are "
        "thread-seconds (samples / 100) per thread. Groups: wait (the thread blocks on a lock, "
        "queue or future), else the innermost frame that names one: select (exact top-k "
        "thresholds: `kth_largest`, ...), random mask (DARE's draws), write (the shard "
        "writer), read (the checkpoint reader), convert (an amalgam line that casts: "
        "`.float()`, `.to(...)`), compute (any other amalgam line: deltas, sign election, "
        "sums); other: no amalgam frame (interpreter start, imports). py-spy samples "
        "Python frames: time in a torch op is charged to the Python line that called it. "
        "Sampling slows the run a little.",
        "",
    ]
    for method, stacks, merge_s in profiles:
        parts.append(profile_markdown(method, group_profile(stacks), merge_s or float("nan")))
        top = summarize_stacks(busy(stacks), 12).split("self (line level):")[-1]
        parts += [
            "Hottest lines (share of the samples of threads not waiting):",
            "",
            "```",
            top.strip("\n"),
            "```",
            "",
        ]
    name = "speed-profile-quick.md" if quick else "speed-profile.md"
    (RESULTS / name).write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=0.5e9, help="parameters per model")
    ap.add_argument("--experts", type=int, default=3, help="fine-tuned models besides the base")
    ap.add_argument("--quick", action="store_true", help="a ~50M-parameter smoke run")
    ap.add_argument("--skip-mergekit", action="store_true", help="amalgam and read bound only")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument(
        "--mergekit-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="mergekit's compute dtype (float32: the same math as amalgam)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also run each amalgam merge under py-spy; summaries in results/profile-*.txt",
    )
    ap.add_argument(
        "--adapters",
        type=int,
        nargs="?",
        const=8,
        default=0,
        help="merge this many LoRA adapters (default 8) with amalgam and with PEFT instead",
    )
    ap.add_argument("--rank", type=int, default=16, help="the adapters' rank (--adapters)")
    ap.add_argument(
        "--align", action="store_true", help="weight matching + merge of two models instead"
    )
    ap.add_argument(
        "--ray", action="store_true", help="the Ray executor on this machine against local"
    )
    ap.add_argument(
        "--experts-sweep",
        default="",
        metavar="N,N,...",
        help="instead: amalgam alone on the first N experts of one base + max(N) family "
        "(e.g. 3,7,15 with --params 0.25e9): in-engine s and peak RSS per method and N",
    )
    ap.add_argument(
        "--skip-cli", action="store_true", help="no `amalgam merge` run beside the engine's"
    )
    ap.add_argument(
        "--s3",
        action="store_true",
        help="instead: the family from a SeaweedFS bucket on loopback (benchmarks/s3_reads.py)",
    )
    ap.add_argument("--results", help="results file stem under benchmarks/results/")
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--update-readme", action="store_true", help="put the table in README.md")
    args = ap.parse_args(argv)
    params = 5e7 if args.quick else args.params
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: {m!r} is not one of {', '.join(METHODS)}")

    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.adapters:
        return run_adapters(args, params)
    if args.align:
        return run_align(args, params)
    if args.ray:
        return run_ray(args, params, methods)
    shape = llama_shape(params)
    if args.s3:
        import s3_reads  # it imports this module

        family = build_family(shape, args.experts, args.work)["base"].parent
        return s3_reads.main(
            ["--family", str(family), "--experts", str(args.experts), "--work", str(args.work)]
        )
    sweep = [int(n) for n in args.experts_sweep.split(",") if n.strip()]
    if sweep:
        return run_sweep(args, shape, sweep, methods)
    mk_exe = None if args.skip_mergekit else ensure_mergekit(args.work)
    paths = build_family(shape, args.experts, args.work)
    runs = run_folder(args.work)
    rb = read_bound(list(paths.values()))
    home = runs / "home"
    hash_s = warm_hashes(list(paths.values()), home)
    print(
        f"read bound: {rb.bytes / 1e9:.2f} GB in {rb.amalgam_s:.2f}s ({rb.gb_s:.2f} GB/s); "
        f"plain {rb.plain_s:.2f}s; cold content hashes {hash_s:.2f}s",
        flush=True,
    )

    mk_startup = None if mk_exe is None else mergekit_startup(mk_exe, runs / "mergekit-help.log")
    rows, profiles = [], []
    for method in methods:
        cfg = mergekit_config(method, paths, args.mergekit_dtype)
        cfg_path = runs / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        am_out = runs / f"{method}-amalgam"
        state = source_state()  # the checkout is shared: record what this run imported
        am = run_amalgam(cfg_path, am_out, runs / f"{method}-amalgam.log", home=home)
        if am.returncode:
            raise SystemExit(f"amalgam {method} failed:\n{am.output}")
        row = amalgam_row(method, am, rb)
        row["amalgam_source"] = state
        if not args.skip_cli:
            cli = run_cli(cfg_path, runs / f"{method}-cli", runs / f"{method}-cli.log", home)
            if cli.returncode:
                raise SystemExit(f"amalgam merge {method} failed:\n{cli.output}")
            row |= {"cli_wall_s": cli.wall_s, "cli_merge_s": cli.info["merge_s"]}
        print(f"{method}: amalgam {am.wall_s:.2f}s, {am.peak_rss / 1e9:.2f} GB", flush=True)
        if mk_exe is not None:
            mk_out = runs / f"{method}-mergekit"
            mk = run_mergekit(mk_exe, cfg_path, mk_out, runs / f"{method}-mergekit.log")
            if mk.returncode:
                raise SystemExit(f"mergekit {method} failed:\n{mk.output}")
            row |= {
                "mergekit_wall_s": mk.wall_s,
                "mergekit_rss": mk.peak_rss,
                "speedup": mk.wall_s / am.wall_s,
                "speedup_merge_only": (mk.wall_s - (mk_startup or 0.0)) / am.info["merge_s"],
            }
            print(f"{method}: mergekit {mk.wall_s:.2f}s, {mk.peak_rss / 1e9:.2f} GB", flush=True)
            if method in DETERMINISTIC:
                row["compare"] = compare(am_out, mk_out)
            else:
                row["dare_stats"] = {
                    "amalgam": delta_stats(am_out, paths["base"]),
                    "mergekit": delta_stats(mk_out, paths["base"]),
                }
            shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(am_out, ignore_errors=True)
        if args.profile:
            stacks, merge_s = profile_amalgam(cfg_path, am_out, runs / f"{method}-pyspy.txt", home)
            profiles.append((method, stacks, merge_s))
        rows.append(row)

    result = {
        "params": shape.params,
        "shape": asdict(shape),
        "experts": args.experts,
        "models": len(paths),
        "machine": machine(),
        "cpu": cpu_model(),
        "amalgam": source_state(),
        "mergekit": None if mk_exe is None else MERGEKIT_VERSION,
        "mergekit_dtype": args.mergekit_dtype,
        "mergekit_startup_s": mk_startup,
        "read_bound": {**asdict(rb), "gb_s": rb.gb_s},
        "hash_s": hash_s,
        "rows": rows,
        "argv": sys.argv[1:] if argv is None else argv,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    result["targets"] = targets(rows)
    table = markdown(result)
    write_results(args.results or ("speed-quick" if args.quick else "speed"), result, table)
    if profiles:
        write_profile(result, profiles, args.quick)
    if args.update_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
