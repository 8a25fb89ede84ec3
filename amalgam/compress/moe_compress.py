"""``compress.method: mc_smoe``: write an MoE with fewer experts per layer, streamed.

Reads the routing statistics (cached, :mod:`amalgam.compress.routing`), groups and merges the
experts of each layer (:mod:`amalgam.compress.mc_smoe`) and writes a model that transformers
loads with its own config (the expert count lowered). Tensors other than routers and experts
are copied one at a time; a group's experts are read when the first of its merged tensors is
due and dropped after the last, so peak memory is one group's expert weights in float32 (plus
the model, in float32, once for the calibration pass when the statistics are not cached).

With ``losparse_rank`` the output is instead a compressed folder (``compression.json``, method
``mc_smoe``): each merged expert weight low-rank + sparse (:mod:`amalgam.compress.losparse`),
the rest dense, spooled into shards like ComPEFT's; ``amalgam decompress`` rebuilds the dense
MoE. The output is committed like every amalgam output; its safetensors metadata and
``mc_smoe.json`` (groups, frequencies, parameters and bytes before/after) carry the content
key (settings, the model's and the statistics' content hashes), so a second run finds it done
and skips.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from amalgam import __version__, storage
from amalgam.checkpoint import DTYPE_NAMES, Checkpoint, open_checkpoint
from amalgam.compress import losparse
from amalgam.compress.errors import CompressError
from amalgam.compress.folder import FORMAT, MANIFEST
from amalgam.compress.mc_smoe import (
    Expert,
    dominant_groups,
    fold_router,
    group_weights,
    merge_group,
)
from amalgam.compress.routing import MoELayout, cached_routing, frequencies, moe_layout, similarity
from amalgam.compress.stage import ShardSpool
from amalgam.engine.inputs import check_output
from amalgam.engine.plan import TensorJob, shard_jobs
from amalgam.errors import StatisticsError
from amalgam.recipe import CompressSpec
from amalgam.stages.base import content_key
from amalgam.statistics.data import load_examples
from amalgam.writer import CheckpointWriter, committed_with

REPORT = "mc_smoe.json"
KEY = "amalgam.mc_smoe_key"
#: Side files not copied: rewritten here, or about the input (``amalgam moe``'s build record).
NOT_COPIED = ("config.json", REPORT, "moe.json", MANIFEST)
PAPER = "arXiv:2310.01334"


@dataclass(frozen=True)
class MoECompressResult:
    """Where the smaller MoE is, whether it was already there, and its report (``mc_smoe.json``:
    per layer the groups and frequencies, parameters and bytes before and after)."""

    output: str
    content_hash: str
    skipped: bool
    report: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        r = self.report
        return {
            "output": self.output,
            "experts": r["experts"],
            "params_before": r["params_before"],
            "params_after": r["params_after"],
            "bytes_before": r["bytes_before"],
            "bytes_after": r["bytes_after"],
        }


def compress_moe(
    model_uri: str,
    output_uri: str,
    spec: CompressSpec,
    *,
    overwrite: bool = False,
    max_shard_size: int | None = None,
    **storage_options: Any,
) -> MoECompressResult:
    """Merge the experts of the MoE at ``model_uri`` (a local folder: the calibration pass runs
    it) down to ``spec.experts`` per layer into ``output_uri``; skipped when ``output_uri``
    already holds this result, intact. Nothing is left at ``output_uri`` on failure."""
    with ExitStack() as stack:
        model = stack.enter_context(open_checkpoint(model_uri, **storage_options))
        layout = moe_layout(model)
        k = _target(spec, layout, model.uri)
        if spec.calibration is None:
            raise CompressError("compress.calibration: mc_smoe needs calibration data (jsonl)")
        info, _ = cached_routing(model_uri, spec.calibration, spec.calibration_samples)
        stats = stack.enter_context(open_checkpoint(info.uri))
        key = content_key(
            "mc_smoe", [spec.settings(), model.content_hash(), info.content_hash, "v1"]
        )
        if committed_with(output_uri, KEY, key, **storage_options):
            return _result(output_uri, True, storage_options)
        check_output(output_uri, {"model": model}, overwrite, storage_options)
        groups, freqs = {}, {}
        for layer in layout.layers:
            gate = layout.layout.gate(layer)
            freqs[layer] = frequencies(stats.tensor(f"{gate}.counts"))
            sim = similarity(stats.tensor(f"{gate}.logit_gram"))
            groups[layer] = dominant_groups(freqs[layer], sim, k)
        report = {
            "key": key,
            "method": "mc_smoe",
            "paper": PAPER,
            "amalgam_version": __version__,
            "settings": spec.settings(),
            "model": {"uri": model.uri, "hash": model.content_hash()},
            "routing": {
                "uri": info.uri,
                "hash": info.content_hash,
                "data_hash": info.data_hash,
                "tokens": info.tokens,
            },
            "experts_before": layout.experts,
            "experts": k,
            "layers": {
                str(layer): {
                    "groups": groups[layer],
                    "frequency": [round(float(f), 6) for f in freqs[layer]],
                }
                for layer in layout.layers
            },
        }
        _write(
            model,
            layout,
            groups,
            freqs,
            spec,
            key,
            report,
            output_uri,
            overwrite,
            max_shard_size or spec.max_shard_size,
            storage_options,
            stats,
        )
    return _result(output_uri, False, storage_options)


def _target(spec: CompressSpec, layout: MoELayout, uri: str) -> int:
    if spec.experts is None:
        raise CompressError("compress.experts: mc_smoe needs the number of experts to keep")
    if spec.experts > layout.experts:
        raise CompressError(
            f"compress.experts: {spec.experts} is more than the {layout.experts} experts per "
            f"layer of {uri}"
        )
    return spec.experts


def mc_smoe_done(output: str, spec: CompressSpec, model_hash: str, so: dict[str, Any]) -> bool:
    """``output`` holds the MoE of hash ``model_hash`` compressed with ``spec``, intact, its
    calibration data unchanged (by its records' hash); no model is run."""
    try:
        report = read_report(output, **so)
    except (CompressError, ValueError, OSError):
        return False
    same = report.get("settings") == spec.settings() and report["model"]["hash"] == model_hash
    if not same or spec.calibration is None:
        return False
    try:
        _, data_hash = load_examples(spec.calibration, **so)
    except StatisticsError:
        return False
    return data_hash == report["routing"]["data_hash"] and committed_with(
        output, KEY, report["key"], **so
    )


def _plan(
    model: Checkpoint,
    layout: MoELayout,
    groups: dict[int, list[list[int]]],
    freqs: dict[int, torch.Tensor],
    spec: CompressSpec,
    report: dict[str, Any],
) -> tuple[list[TensorJob], dict[str, Callable[[], torch.Tensor]]]:
    """Output tensors in file order, and how to produce each; merging a group records in
    ``report`` how many units the alignment moved in each member."""
    jobs: list[TensorJob] = []
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    skipped: set[str] = set()
    merged: dict[tuple[int, int], tuple[Expert, set[str]]] = {}

    def add(name: str, shape: tuple[int, ...], dtype: torch.dtype, read: Callable) -> None:
        jobs.append(TensorJob(name, tuple(shape), DTYPE_NAMES[dtype], copy=True, layer=None))
        readers[name] = read

    def expert_tensor(layer: int, g: int, projection: str, dtype: torch.dtype) -> torch.Tensor:
        """One merged tensor; the group is merged on first use and freed after its last."""
        if (layer, g) not in merged:
            group = groups[layer][g]
            members = [
                {p: model.tensor(n).float() for p, n in layout.expert_tensors(layer, e).items()}
                for e in group
            ]
            weights = group_weights(group, freqs[layer], spec.expert_merge)
            weights_of, moved = merge_group(members, weights, spec.align)
            report["layers"][str(layer)].setdefault("units_moved", {})[str(g)] = moved
            merged[(layer, g)] = (weights_of, set(members[0]))
        weights_of, left = merged[(layer, g)]
        left.discard(projection)
        out = weights_of[projection].to(dtype)
        if not left:
            del merged[(layer, g)]
        return out

    for layer in layout.layers:
        skipped.add(layout.layout.gate(layer))
        for e in range(layout.experts):
            skipped.update(layout.expert_tensors(layer, e).values())
    for name in model.names():
        if name not in skipped:
            add(name, model.shape(name), model.dtype(name), lambda n=name: model.tensor(n))
    for layer, layer_groups in groups.items():
        gate = layout.layout.gate(layer)
        weights = [group_weights(g, freqs[layer], spec.expert_merge) for g in layer_groups]

        def router(gate=gate, groups=layer_groups, weights=weights) -> torch.Tensor:
            return fold_router(model.tensor(gate), groups, weights, spec.router_fold)

        shape = (len(layer_groups), model.shape(gate)[1])
        add(gate, shape, model.dtype(gate), router)
        for g, group in enumerate(layer_groups):
            source = layout.expert_tensors(layer, group[0])
            for projection, out in layout.expert_tensors(layer, g).items():
                dtype = model.dtype(source[projection])

                def read(layer=layer, g=g, projection=projection, dtype=dtype) -> torch.Tensor:
                    return expert_tensor(layer, g, projection, dtype)

                add(out, model.shape(source[projection]), dtype, read)
    jobs.sort(key=lambda j: j.name)
    return jobs, readers


def _write(
    model: Checkpoint,
    layout: MoELayout,
    groups: dict[int, list[list[int]]],
    freqs: dict[int, torch.Tensor],
    spec: CompressSpec,
    key: str,
    report: dict[str, Any],
    output: str,
    overwrite: bool,
    max_shard_size: int,
    so: dict[str, Any],
    routing: Checkpoint,
) -> None:
    """The compressed model into ``output``: committed only if neither ``model`` nor its
    ``routing`` statistics changed while read."""
    jobs, readers = _plan(model, layout, groups, freqs, spec, report)
    k = report["experts"]
    metadata = {"format": "pt", KEY: key, "parents": f"model={model.content_hash()}"}
    report.update(
        params_before=model.num_params,
        params_after=sum(_numel(j.shape) for j in jobs),
        bytes_before=model.nbytes,
        bytes_after=sum(j.nbytes for j in jobs),
    )
    writer = CheckpointWriter(output, overwrite=overwrite, sources=[model, routing], **so)
    try:
        if spec.losparse_rank is None:
            writer.write_units(
                shard_jobs(jobs, max_shard_size), lambda name: readers[name](), metadata
            )
        else:
            experts = {
                name
                for layer in layout.layers
                for g in range(k)
                for name in layout.expert_tensors(layer, g).values()
            }
            _write_losparse(writer, model, jobs, readers, experts, spec, metadata, report)
        config = dict(model.config)
        config[layout.count_field] = k
        config["num_experts_per_tok"] = min(layout.top_k, k)
        writer.write_json("config.json", config)
        for name in model.side_files():
            if name not in NOT_COPIED:
                writer.copy_in(model.fs, storage.join(model.root, name), name)
        writer.write_json(REPORT, report)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _write_losparse(
    writer: CheckpointWriter,
    model: Checkpoint,
    jobs: list[TensorJob],
    readers: dict[str, Callable[[], torch.Tensor]],
    experts: set[str],
    spec: CompressSpec,
    metadata: dict[str, str],
    report: dict[str, Any],
) -> None:
    """The merged model as a compressed folder: the ``experts`` tensors low-rank + sparse
    (:mod:`amalgam.compress.losparse`), the others dense, and ``compression.json``; records in
    ``report`` the parameters stored and ``bytes_after``, the exact bytes of the shards
    (headers included) and the manifest."""
    assert spec.losparse_rank is not None
    spool = ShardSpool(writer, spec.max_shard_size, metadata)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "method": "mc_smoe",
        "paper": PAPER,
        "kind": "model",
        "settings": spec.settings(),
        "base": None,
        "model": {"uri": model.uri, "hash": model.content_hash()},
        "amalgam": __version__,
        "tensors": {},
    }
    stored_params = 0
    for job in jobs:
        weights = readers[job.name]()
        entry: dict[str, Any] = {"shape": list(job.shape), "dtype": job.dtype}
        if job.name in experts:
            parts = losparse.losparse(weights, spec.losparse_rank, spec.losparse_density)
            stored, kept = losparse.encode(job.name, parts), parts.positions.numel()
            entry |= {"encoding": losparse.ENCODING, "kept": kept, "base_tensor": None}
            stored_params += parts.u.numel() + parts.v.numel() + 2 * kept
        else:
            stored = [(job.name, weights)]
            entry |= {"encoding": "dense", "kept": weights.numel()}
            stored_params += weights.numel()
        manifest["tensors"][job.name] = entry | {"file": spool.add(stored)}
    spool.flush()
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    with writer.fs.open(storage.join(writer.staging, MANIFEST), "wb") as fh:
        fh.write(raw)
    report.update(
        stored_params=stored_params,
        bytes_after=sum(spool.files.values()) + len(raw),
        files={**spool.files, MANIFEST: len(raw)},
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_report(uri: str, **storage_options: Any) -> dict[str, Any]:
    """The ``mc_smoe.json`` of an MC-SMoE output."""
    fs, path = storage.resolve(uri, **storage_options)
    file = storage.join(path, REPORT)
    if not fs.exists(file):
        raise CompressError(f"{uri}: no {REPORT}, so not an mc_smoe output")
    with fs.open(file, "rb") as fh:
        return json.loads(fh.read())


def _result(output: str, skipped: bool, so: dict[str, Any]) -> MoECompressResult:
    with open_checkpoint(output, **so) as ckpt:
        return MoECompressResult(
            output=storage.full_uri(ckpt.fs, ckpt.path),
            content_hash=ckpt.content_hash(),
            skipped=skipped,
            report=read_report(output, **so),
        )
