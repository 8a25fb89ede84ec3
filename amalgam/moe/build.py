"""Build an MoE from dense Llama/Mistral experts (what mergekit-moe does), streamed.

Every tensor that is not an MLP weight (embeddings, attention, norms, LM head) is copied from
the base; in each layer ``l``, expert ``e`` holds expert model ``e``'s MLP of layer ``l``, and
the router (experts x hidden) comes from :mod:`amalgam.moe.router`. Two output layouts
(:mod:`amalgam.moe.layout`): Mixtral (``block_sparse_moe.experts.{e}.w1/w2/w3`` =
``gate_proj``/``down_proj``/``up_proj``) and Qwen2-MoE (``mlp.experts.{e}.*_proj``, plus one
shared expert ``mlp.shared_expert.*`` and its gate ``mlp.shared_expert_gate`` (1 x hidden),
which scales the shared expert by a sigmoid). Each output tensor is one input tensor, so the
output is written tensor by tensor, never holding a model. Peak memory is the largest tensor
(cast once) plus the routers (layers x experts x hidden floats); for ``gate_mode: hidden``
the base model is loaded once, in float32, before any tensor is written, and freed.

The output is committed like every amalgam output (``amalgam-commit.json``); its safetensors
metadata and ``moe.json`` carry the build's content key (config, base and expert content
hashes), so a second build of the same config over the same inputs finds it done and skips.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from amalgam import __version__, storage
from amalgam.checkpoint import DTYPE_NAMES, Checkpoint, open_checkpoint
from amalgam.engine.inputs import check_output
from amalgam.engine.plan import TensorJob, shard_jobs
from amalgam.errors import AmalgamError
from amalgam.moe.config import ExpertSpec, MoEConfig, MoEError
from amalgam.moe.layout import LAYOUTS
from amalgam.moe.router import gate_weights
from amalgam.stages.base import content_key
from amalgam.writer import CheckpointWriter, committed_with

MANIFEST = "moe.json"
KEY = "amalgam.moe_key"
MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight")
SUPPORTED = ("llama", "mistral")


@dataclass(frozen=True)
class MoEResult:
    """A built MoE: where it is, its content hash, whether it was already there, its size."""

    output: str
    content_hash: str
    skipped: bool
    experts: int
    layers: int
    num_params: int


def build_moe(
    config: MoEConfig,
    output: str,
    *,
    overwrite: bool = False,
    max_shard_size: int = 5 << 30,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> MoEResult:
    """Write the MoE that ``config`` describes into ``output`` (skipped when ``output``
    already holds this build, intact)."""
    so = storage_options or {}
    with ExitStack() as stack:
        base = _open(stack, config.base_model, "base_model", so)
        experts = [
            _open(stack, e.source_model, f"experts.{i}.source_model", so)
            for i, e in enumerate(config.experts)
        ]
        shared = [
            _open(stack, e.source_model, f"shared_experts.{i}.source_model", so)
            for i, e in enumerate(config.shared_experts)
        ]
        fields = [f"experts.{i}" for i in range(len(experts))]
        fields += [f"shared_experts.{i}" for i in range(len(shared))]
        experts += shared
        check_inputs(base, dict(zip(fields, experts, strict=True)))
        key = build_key(config, base, experts)
        layers = int(base.config["num_hidden_layers"])
        if committed_with(output, KEY, key, **so):
            log(f"{output} already holds this MoE ({key[:20]}...)")
            return _result(output, so, True, len(config.experts), layers)
        inputs = {"base": base} | {f"expert {i}": c for i, c in enumerate(experts)}
        check_output(output, inputs, overwrite, so)
        log(f"router: gate_mode {config.gate_mode} over {len(experts)} experts")
        gates = gate_weights(config, base)
        dtype = _dtype(config, base)
        _write(config, base, experts, gates, dtype, key, output, overwrite, max_shard_size, so)
    return _result(output, so, False, len(config.experts), layers)


def _open(stack: ExitStack, uri: str, field: str, so: dict[str, Any]) -> Checkpoint:
    try:
        return stack.enter_context(open_checkpoint(uri, **so))
    except AmalgamError as exc:
        raise MoEError(f"{field}: {exc}") from None


def check_inputs(base: Checkpoint, experts: dict[str, Checkpoint]) -> None:
    """The base is a Llama/Mistral without MLP or attention biases, and every expert (by its
    config field) has its architecture and every MLP tensor with the base's shape; one error
    lists every problem."""
    cfg = base.config or {}
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise MoEError(
            f"{base.uri}: model_type {kind!r}; an MoE is built from {' or '.join(SUPPORTED)} models"
        )
    for flag in ("mlp_bias", "attention_bias"):
        if cfg.get(flag):
            raise MoEError(f"{base.uri}: {flag} is true; the MoE layouts have no such biases")
    mlp = [n for n in base.names() if MLP.fullmatch(n)]
    if not mlp:
        raise MoEError(f"{base.uri}: no MLP tensors named like model.layers.N.mlp.gate_proj.weight")
    problems = []
    for field, ckpt in experts.items():
        other = ckpt.config or {}
        for setting in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if other.get(setting) != cfg.get(setting):
                problems.append(
                    f"{field} ({ckpt.uri}): {setting} {other.get(setting)!r}, "
                    f"base has {cfg.get(setting)!r}"
                )
        names = set(ckpt.names())
        for name in mlp:
            if name not in names:
                problems.append(f"{field} ({ckpt.uri}): no tensor {name}")
            elif ckpt.shape(name) != base.shape(name):
                problems.append(
                    f"{field} ({ckpt.uri}): {name} has shape {list(ckpt.shape(name))}, "
                    f"base {list(base.shape(name))}"
                )
    if problems:
        shown = problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise MoEError("experts do not fit the base:\n  " + "\n  ".join(shown))


def build_key(config: MoEConfig, base: Checkpoint, experts: list[Checkpoint]) -> str:
    """The content key of a build: the config with every model named by its content hash
    (``experts``: the experts' checkpoints, then the shared experts')."""
    body = config.model_dump(exclude={"base_model"})
    for spec, ckpt in zip([*body["experts"], *body["shared_experts"]], experts, strict=True):
        spec["source_model"] = ckpt.content_hash()
    body["base_model"] = base.content_hash()
    body["format"] = f"{config.output_architecture}-v1"
    return content_key("moe", body)


def _dtype(config: MoEConfig, base: Checkpoint) -> str:
    """The output dtype: the config's, else the base config's, else the base embedding's."""
    cfg = base.config or {}
    name = config.dtype or cfg.get("dtype") or cfg.get("torch_dtype")
    if name in ("float32", "float16", "bfloat16"):
        return name
    return str(base.dtype(base.names()[0])).removeprefix("torch.")


def _plan(
    config: MoEConfig, base: Checkpoint, experts: list[Checkpoint], dtype: str, gates: torch.Tensor
) -> tuple[list[TensorJob], dict[str, Callable[[], torch.Tensor]]]:
    """Output tensors in file order, and how to produce each (read one input tensor)."""
    layout = LAYOUTS[config.output_architecture]
    target = getattr(torch, dtype)
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    jobs: list[TensorJob] = []

    def add(name: str, shape: tuple[int, ...], src_dtype: torch.dtype, read: Callable) -> None:
        out = target if src_dtype.is_floating_point else src_dtype
        jobs.append(TensorJob(name, tuple(shape), DTYPE_NAMES[out], copy=True, layer=None))
        readers[name] = lambda: read().to(out)

    def copy(ckpt: Checkpoint, name: str, scale: float | None = None) -> Callable:
        if scale is None:
            return lambda: ckpt.tensor(name)
        return lambda: ckpt.tensor(name).float() * scale

    def mlp_of(spec: ExpertSpec, ckpt: Checkpoint, projection: str, name: str, out: str) -> None:
        scale = spec.residual_scale if projection == "down" else None
        add(out, base.shape(name), ckpt.dtype(name), copy(ckpt, name, scale))

    mlp: dict[int, list[tuple[str, str]]] = {}
    for name in base.names():
        match = MLP.fullmatch(name)
        if match is None:
            add(name, base.shape(name), base.dtype(name), copy(base, name))
        else:
            mlp.setdefault(int(match.group(1)), []).append((match.group(2), name))
    n = len(config.experts)
    for layer in sorted(mlp):
        g = gates[layer]
        add(layout.gate(layer), (n, g.shape[1]), g.dtype, lambda g=g: g[:n])
        specs = [*config.experts, *config.shared_experts]
        for e, (spec, ckpt) in enumerate(zip(specs, experts, strict=True)):
            for projection, name in mlp[layer]:
                if e < n:
                    mlp_of(spec, ckpt, projection, name, layout.expert(layer, e, projection))
                else:
                    mlp_of(spec, ckpt, projection, name, layout.shared_expert(layer, projection))
        if layout.shared:
            add(layout.shared_gate(layer), (1, g.shape[1]), g.dtype, lambda g=g: g[n : n + 1])
    jobs.sort(key=lambda j: j.name)
    return jobs, readers


def _write(
    config: MoEConfig,
    base: Checkpoint,
    experts: list[Checkpoint],
    gates: torch.Tensor,
    dtype: str,
    key: str,
    output: str,
    overwrite: bool,
    max_shard_size: int,
    so: dict[str, Any],
) -> None:
    jobs, readers = _plan(config, base, experts, dtype, gates)
    units = shard_jobs(jobs, max_shard_size)
    parents = ";".join(
        [f"base={base.content_hash()}"]
        + [f"expert{i}={c.content_hash()}" for i, c in enumerate(experts)]
    )
    metadata = {"format": "pt", KEY: key, "parents": parents, "amalgam_version": __version__}
    writer = CheckpointWriter(output, overwrite=overwrite, sources=[base, *experts], **so)
    try:
        writer.write_units(units, lambda name: readers[name](), metadata)
        layout = LAYOUTS[config.output_architecture]
        settings = layout.config(base.config, len(config.experts), config.experts_per_token, dtype)
        writer.write_json("config.json", settings)
        for name in base.side_files():
            if name != "config.json":
                writer.copy_in(base.fs, storage.join(base.root, name), name)
        writer.write_json(MANIFEST, _manifest(config, base, experts, key))
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _manifest(
    config: MoEConfig, base: Checkpoint, experts: list[Checkpoint], key: str
) -> dict[str, Any]:
    """What ``moe.json`` records: the key, the config, and every input's URI and hash."""
    return {
        "key": key,
        "amalgam_version": __version__,
        "architecture": config.output_architecture,
        "config": config.model_dump(),
        "base": {"uri": base.uri, "hash": base.content_hash()},
        "experts": [{"uri": c.uri, "hash": c.content_hash()} for c in experts],  # shared last
    }


def _result(output: str, so: dict[str, Any], skipped: bool, experts: int, layers: int) -> MoEResult:
    with open_checkpoint(output, **so) as ckpt:
        return MoEResult(
            output=storage.full_uri(ckpt.fs, ckpt.path),
            content_hash=ckpt.content_hash(),
            skipped=skipped,
            experts=experts,
            layers=layers,
            num_params=ckpt.num_params,
        )
