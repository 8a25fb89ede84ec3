"""Build a Twin-Merging folder (Lu et al., NeurIPS 2024, arXiv 2406.15479).

A Twin folder is the shared model (a merge of all experts by the recipe's method, e.g. task
arithmetic or TIES, made by the engine) as a normal Hugging Face folder that transformers
loads, plus per task the exclusive knowledge ``delta_t = theta_t - theta*`` of each tensor:
2-D tensors as truncated-SVD factors ``U_r S_r`` and ``V_r^T`` (``factors-NNNNN.safetensors``,
names ``<task>/<tensor>.us`` and ``.v``), 1-D tensors (norms, biases) dense (``.delta``); the
router (``router.safetensors``); and ``twin.json``: content hashes of base, shared model and
experts, rank, tasks, router figures, and every weight file's exact byte count.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from amalgam import __version__, storage
from amalgam.checkpoint import Checkpoint, open_checkpoint
from amalgam.compress.stage import ShardSpool
from amalgam.engine import MergeOptions, run_merge
from amalgam.evaluate.score import local_model
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import Recipe
from amalgam.stages.base import content_key
from amalgam.twin.errors import TwinError
from amalgam.twin.manifest import FORMAT, MANIFEST, ROUTER, read_twin_manifest
from amalgam.twin.router import Router, prompt_features, train_router
from amalgam.twin.spec import TwinSpec
from amalgam.twin.svd import truncated_svd
from amalgam.writer import INDEX_NAME, CheckpointWriter, intact, remove_leftovers, shard_header

PAPER = "arXiv:2406.15479"


@dataclass
class TwinResult:
    """Where the Twin folder is, whether it was already there, and its exact weight bytes:
    ``files`` maps each weight file (shared shards, factor shards, router, manifest) to its
    size; config and tokenizer files are not counted."""

    output: str
    skipped: bool
    shared_reused: bool
    files: dict[str, int]
    shared_bytes: int
    factor_bytes: int
    router_bytes: int
    experts_bytes: int
    router_accuracy: float

    @property
    def stored_bytes(self) -> int:
        return sum(self.files.values())


def build_twin(
    recipe: Recipe,
    spec: TwinSpec,
    output_uri: str,
    *,
    options: MergeOptions | None = None,
    overwrite: bool = False,
) -> TwinResult:
    """Merge ``recipe``'s experts into the shared model, store each expert's exclusive
    knowledge at ``spec``'s rank and train the router. Each finished step is reused by a rerun
    (the shared merge by its recipe hash, the whole folder by its content key)."""
    tasks = [m.label for m in recipe.models]
    so = recipe.storage_options
    records = {t: _router_records(spec, t, spec.router_split) for t in tasks}
    held_out = "validation" if spec.router_split == "train" else "train"
    checks = {t: _router_records(spec, t, held_out) for t in tasks}
    shared_uri = spec.shared_output or output_uri.rstrip("/") + ".shared"
    shared_reused = _shared_done(shared_uri, recipe)
    if not shared_reused:
        opts = (options or MergeOptions()).model_copy(update={"output": shared_uri})
        run_merge(recipe, opts.model_copy(update={"overwrite": True}))
    with ExitStack() as stack:
        shared = stack.enter_context(open_checkpoint(shared_uri, **so))
        experts = {
            m.label: stack.enter_context(open_checkpoint(m.uri, **so)) for m in recipe.models
        }
        _check_shapes(shared, experts, spec.rank)
        key = content_key(
            "twin",
            [
                spec.model_dump(exclude={"shared_output", "tasks_dir"}),
                recipe.hash(),
                shared.content_hash(),
            ]
            + [e.content_hash() for e in experts.values()]
            + [_records_hash(records), _records_hash(checks)],
        )
        done = _existing(output_uri, key, so)
        if done is not None:
            return _result(output_uri, done, so, skipped=True, shared_reused=shared_reused)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "method": "twin",
            "paper": PAPER,
            "key": key,
            "amalgam": __version__,
            "rank": spec.rank,
            "share": spec.share,
            "tasks": tasks,
            "recipe": {"method": recipe.method, "params": recipe.params, "hash": recipe.hash()},
            "base": _base_entry(recipe, so),
            "shared": {"uri": shared.uri, "hash": shared.content_hash()},
            "experts": {t: _entry(e) for t, e in experts.items()},
            "tensors": {},
        }
        sources = [shared, *experts.values()]
        writer = CheckpointWriter(output_uri, overwrite=overwrite, sources=sources, **so)
        try:
            files = _copy_shared(shared, writer)
            factors = _write_factors(shared, experts, writer, spec, manifest)
            manifest["shared_files"], manifest["factor_files"] = sorted(files), sorted(factors)
            files |= factors
            router, accuracy = _train(shared_uri, spec, tasks, records, checks, so)
            files[ROUTER] = _write_router(writer, router)
            manifest["router"] = {
                "feature": "mean last hidden state of the shared model over the prompt",
                "model": "logistic regression",
                "split": spec.router_split,
                "limit": spec.router_limit,
                "steps": spec.router_steps,
                "held_out_split": held_out,
                "held_out_accuracy": accuracy,
            }
            manifest["files"] = files
            raw = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
            with writer.fs.open(storage.join(writer.staging, MANIFEST), "wb") as fh:
                fh.write(raw)
            for side in shared.side_files():
                writer.copy_in(shared.fs, storage.join(shared.root, side), side)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return _result(output_uri, manifest, so, skipped=False, shared_reused=shared_reused)


def _router_records(spec: TwinSpec, task: str, split: str) -> list[dict[str, Any]]:
    """The first ``router_limit`` records of ``task``'s ``split`` (the router's data)."""
    tasks_dir = Path(spec.tasks_dir)
    path = tasks_dir / task / f"{split}.jsonl"
    if not path.is_file():
        raise TwinError(
            f"router data: task '{task}' has no {split} split at {path} (each model's label "
            f"names its task folder under {tasks_dir})"
        )
    records = read_split(tasks_dir, task, split)[: spec.router_limit]
    if not records:
        raise TwinError(f"router data: {path} holds no records")
    return records


def _records_hash(records: dict[str, list[dict[str, Any]]]) -> str:
    return content_key("records", {t: [r["prompt"] for r in rs] for t, rs in records.items()})


def _shared_done(uri: str, recipe: Recipe) -> bool:
    """``uri`` holds a finished merge of this recipe (by its shards' recorded recipe hash)."""
    fs, path = storage.resolve(uri, **recipe.storage_options)
    remove_leftovers(fs, path)  # a killed run's staging
    if not intact(fs, path):
        return False
    with open_checkpoint(uri, **recipe.storage_options) as ckpt:
        hashes = {meta.get("recipe_hash") for meta in ckpt.metadata.values()}
    return hashes == {recipe.hash()}


def _check_shapes(shared: Checkpoint, experts: dict[str, Checkpoint], rank: int | None) -> None:
    """Every expert has the shared model's float tensors in its shapes, and ``rank`` is at most
    the largest min(m, n) of a 2-D tensor (a tensor whose smaller side is below ``rank`` keeps
    all of it, exactly). One error lists every problem."""
    problems = []
    sides = {name: min(i.shape) for name, i in shared.tensors.items() if len(i.shape) == 2}
    if rank is not None and sides and rank > max(sides.values()):
        widest = max(sides, key=sides.__getitem__)
        problems.append(
            f"rank {rank} is above min(m, n) = {sides[widest]} of every 2-D tensor (largest: "
            f"'{widest}'): nothing would be truncated"
        )
    for name, info in shared.tensors.items():
        if not info.is_float:
            continue
        for task, e in experts.items():
            if name not in e.tensors or e.tensors[name].shape != info.shape:
                problems.append(f"expert '{task}' ({e.uri}): tensor '{name}' missing or reshaped")
    if problems:
        raise TwinError("cannot build the Twin folder:\n" + "\n".join(problems[:20]))


def _existing(uri: str, key: str, so: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished Twin folder at ``uri`` with this content key, else None."""
    fs, path = storage.resolve(uri, **so)
    remove_leftovers(fs, path)
    if not intact(fs, path):
        return None
    try:
        manifest = read_twin_manifest(uri, **so)
    except TwinError:
        return None
    return manifest if manifest.get("key") == key else None


def _base_entry(recipe: Recipe, so: dict[str, Any]) -> dict[str, str] | None:
    if recipe.base is None:
        return None
    with open_checkpoint(recipe.base, **so) as base:
        return {"uri": base.uri, "hash": base.content_hash()}


def _copy_shared(shared: Checkpoint, writer: CheckpointWriter) -> dict[str, int]:
    """The shared model's weight files (and index), copied as they are: file -> bytes."""
    names = list(shared.files)
    if shared.fs.exists(storage.join(shared.root, INDEX_NAME)):
        names.append(INDEX_NAME)
    for name in names:
        writer.copy_in(shared.fs, storage.join(shared.root, name), name)
    return {name: shared.fs.size(storage.join(shared.root, name)) for name in names}


class _FactorSpool(ShardSpool):
    """The compress stage's shard spool, its files named ``factors-NNNNN.safetensors``."""

    @property
    def current(self) -> str:
        return f"factors-{len(self.files) + 1:05d}.safetensors"


def _write_factors(
    shared: Checkpoint,
    experts: dict[str, Checkpoint],
    writer: CheckpointWriter,
    spec: TwinSpec,
    manifest: dict[str, Any],
) -> dict[str, int]:
    """Each task's exclusive knowledge, tensor by tensor (one shared tensor and one expert
    tensor read at a time): file -> bytes."""
    spool = _FactorSpool(writer, spec.max_shard_size, {"format": "amalgam-twin"})
    for name, info in shared.tensors.items():
        if not info.is_float:
            continue
        theta = shared.tensor(name).float()
        stored: list[tuple[str, torch.Tensor]] = []
        for task, expert in experts.items():
            delta = expert.tensor(name).float() - theta
            if delta.ndim == 2:
                us, v = truncated_svd(delta, spec.rank_of(info.shape))
                stored += [(f"{task}/{name}.us", us.to(info.torch_dtype))]
                stored += [(f"{task}/{name}.v", v.to(info.torch_dtype))]
            else:
                stored.append((f"{task}/{name}.delta", delta.to(info.torch_dtype)))
        file = spool.add(stored)
        entry = {"shape": list(info.shape), "stored": "dense", "file": file}
        if theta.ndim == 2:
            entry |= {"stored": "svd", "rank": spec.rank_of(info.shape)}
        manifest["tensors"][name] = entry
    spool.flush()
    return dict(spool.files)


def _train(
    shared_uri: str,
    spec: TwinSpec,
    tasks: list[str],
    records: dict[str, list[dict[str, Any]]],
    checks: dict[str, list[dict[str, Any]]],
    so: dict[str, Any],
) -> tuple[Router, float]:
    """The router, trained on ``records``, and its task-prediction accuracy on ``checks``."""
    from amalgam.device import load_causal_lm  # lazy: transformers

    with local_model(shared_uri, **so) as folder:
        model, tokenizer = load_causal_lm(folder, "cpu")

        def data(by_task: dict[str, list[dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor]:
            prompts = [r["prompt"] for t in tasks for r in by_task[t]]
            labels = [i for i, t in enumerate(tasks) for _ in by_task[t]]
            return prompt_features(model, tokenizer, prompts), torch.tensor(labels)

        x, y = data(records)
        router = train_router(x, y, tasks, steps=spec.router_steps)
        x_check, y_check = data(checks)
    predicted = router.logits(x_check).argmax(-1)
    return router, float((predicted == y_check).float().mean())


def _write_router(writer: CheckpointWriter, router: Router) -> int:
    tensors = router.tensors()
    entries = [(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    metadata = {"format": "amalgam-twin-router", "tasks": json.dumps(list(router.tasks))}
    shard = writer.shard(ROUTER, entries, metadata)
    written = len(shard_header(entries, metadata))
    try:
        for name, t in tensors.items():
            written += shard.write(name, t.float().contiguous())
    except BaseException:
        shard.discard()
        raise
    shard.close()
    return written


def _entry(ckpt: Checkpoint) -> dict[str, Any]:
    """URI, content hash and weight bytes of a checkpoint."""
    size = sum(ckpt.fs.size(storage.join(ckpt.root, f)) for f in ckpt.files)
    return {"uri": ckpt.uri, "hash": ckpt.content_hash(), "bytes": size}


def _result(
    uri: str, manifest: dict[str, Any], so: dict[str, Any], *, skipped: bool, shared_reused: bool
) -> TwinResult:
    files: dict[str, int] = dict(manifest["files"])
    shared = sum(files[f] for f in manifest["shared_files"])
    factors = sum(files[f] for f in manifest["factor_files"])
    fs, path = storage.resolve(uri, **so)
    return TwinResult(
        output=uri,
        skipped=skipped,
        shared_reused=shared_reused,
        files=files | {MANIFEST: fs.size(storage.join(path, MANIFEST))},
        shared_bytes=shared,
        factor_bytes=factors,
        router_bytes=files[ROUTER],
        experts_bytes=sum(e["bytes"] for e in manifest["experts"].values()),
        router_accuracy=manifest["router"]["held_out_accuracy"],
    )
