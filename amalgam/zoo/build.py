"""Builds the benchmark zoo (base, full fine-tunes, LoRAs, MoE, lm-eval tasks), cached by hash."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amalgam.errors import AmalgamError
from amalgam.evaluate import quick, taskdir
from amalgam.evaluate.quick import quick_evaluate
from amalgam.zoo.lm_tasks import write_tasks
from amalgam.zoo.profiles import PROFILES, Profile
from amalgam.zoo.report import write_report
from amalgam.zoo.tasks import TASKS, make_splits
from amalgam.zoo.tokenizer import build_tokenizer, check_round_trip

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from amalgam.zoo.tasks import Example
    from amalgam.zoo.train import Encoded

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: Libraries whose version can change the bytes of a build.
LIBRARIES = ("torch", "transformers", "tokenizers", "peft")


class ZooError(AmalgamError):
    """A zoo cannot be built or loaded (unknown profile, missing or foreign manifest)."""


@dataclass(frozen=True)
class Zoo:
    """A finished zoo build. Every path is absolute, under `root`."""

    root: Path
    profile: str
    hash: str
    base: Path
    experts: dict[str, Path]
    loras: dict[str, Path]
    moe: Path
    tasks_dir: Path
    task_names: list[str]

    @classmethod
    def load(cls, root: Path) -> Zoo:
        """The zoo whose `manifest.json` lies in `root`."""
        root = Path(root).resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise ZooError(f"{path}: no manifest, so no finished zoo build here")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ZooError(
                f"{path}: manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT}"
            )
        paths = manifest["paths"]
        return cls(
            root=root,
            profile=manifest["profile"],
            hash=manifest["hash"],
            base=root / paths["base"],
            experts={task: root / p for task, p in paths["experts"].items()},
            loras={task: root / p for task, p in paths["loras"].items()},
            moe=root / paths["moe"],
            tasks_dir=root / paths["tasks"],
            task_names=list(manifest["task_names"]),
        )


def default_zoo_dir() -> Path:
    """`$AMALGAM_HOME/zoo`, or `./.amalgam/zoo` when AMALGAM_HOME is unset."""
    return Path(os.environ.get("AMALGAM_HOME", ".amalgam")) / "zoo"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ZooError(f"unknown zoo profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


def source_files() -> list[Path]:
    """The code whose bytes decide a build: the zoo package and the scorer of its report."""
    zoo_files = sorted(Path(__file__).parent.glob("*.py"))
    return [*zoo_files, Path(quick.__file__), Path(taskdir.__file__)]


def zoo_hash(profile: Profile) -> str:
    """12 hex digits of sha256 over the profile, the zoo's source bytes and library versions."""
    digest = hashlib.sha256(profile.model_dump_json().encode())
    for path in source_files():
        digest.update(f"\0{path.name}\0".encode() + path.read_bytes())
    for library in LIBRARIES:
        digest.update(f"\0{library}={version(library)}".encode())
    return digest.hexdigest()[:12]


def seed_for(profile: Profile, stage: str) -> int:
    """A seed per stage, so that each stage's bits do not depend on which stages ran before."""
    return int.from_bytes(hashlib.sha256(f"{profile.seed}:{stage}".encode()).digest()[:4], "big")


def build_zoo(
    out_dir: Path | None = None,
    *,
    profile: str = "full",
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Zoo:
    """Build the zoo of `profile` into `out_dir/<profile>-<hash>/` (default `default_zoo_dir()`)
    and return it; a finished build with the same hash is returned as is unless `force`.

    The build goes into a temporary sibling folder and is renamed into place once its
    manifest is written, so an interrupted build never looks finished."""
    config = get_profile(profile)
    out_dir = Path(out_dir) if out_dir is not None else default_zoo_dir()
    root = (out_dir / f"{profile}-{zoo_hash(config)}").resolve()
    if (root / MANIFEST).is_file() and not force:
        log(f"zoo {root.name}: cached at {root}")
        return Zoo.load(root)
    # lazy: torch and transformers, which a cached zoo does not need
    from amalgam.zoo.train import deterministic_torch

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with deterministic_torch():
            manifest = build_into(tmp, config, final_root=root, log=log)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if force:
            shutil.rmtree(root, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
            log(f"zoo {root.name}: another process finished the same build first")
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Zoo.load(root)


def prepare_data(
    config: Profile,
) -> tuple[PreTrainedTokenizerFast, dict[str, dict[str, list[Example]]], dict[str, list[Encoded]]]:
    """The tokenizer, every task's splits, and the encoded train split of each task."""
    # lazy: torch and transformers, which a cached zoo does not need
    from amalgam.zoo.train import encode_examples

    tokenizer = build_tokenizer(config.base.max_positions)
    sizes = {
        "train": config.train_examples,
        "validation": config.validation_examples,
        "test": config.test_examples,
    }
    splits = {name: make_splits(task, sizes, config.seed) for name, task in TASKS.items()}
    pools = {name: encode_examples(tokenizer, s["train"]) for name, s in splits.items()}
    return tokenizer, splits, pools


def train_base(
    config: Profile,
    tokenizer: PreTrainedTokenizerFast,
    splits: dict[str, dict[str, list[Example]]],
    log: Callable[[str], None],
) -> PreTrainedModel:
    """The base model: a Llama pretrained on the mixture of every task's train split, each
    prompt with the answers of both conventions (see `amalgam.zoo.tasks`)."""
    # lazy: torch and transformers, which a cached zoo does not need
    from amalgam.zoo.train import deterministic_torch, encode_examples, new_model, train

    pools = [encode_examples(tokenizer, s["train"], both=True) for s in splits.values()]
    with deterministic_torch():
        model = new_model(config.base, tokenizer, seed_for(config, "base-init"))
        train(
            model,
            pools,
            config.base_schedule,
            pad_id=tokenizer.pad_token_id,
            seed=seed_for(config, "base"),
            log=log,
            label="base",
        )
    return model


def train_moe(
    config: Profile,
    tokenizer: PreTrainedTokenizerFast,
    pools: dict[str, list[Encoded]],
    log: Callable[[str], None],
) -> PreTrainedModel:
    """The MoE: a Mixtral trained from scratch on the mixture of every task's train split, with
    the profile's load-balancing loss (its bits depend on the profile alone, not on the other
    stages, so a benchmark can train it without building the zoo)."""
    # lazy: torch and transformers, which a cached zoo does not need
    from amalgam.zoo.train import deterministic_torch, new_model, train

    with deterministic_torch():
        moe = new_model(config.moe, tokenizer, seed_for(config, "moe-init"))
        train(
            moe,
            list(pools.values()),
            config.moe_schedule,
            pad_id=tokenizer.pad_token_id,
            seed=seed_for(config, "moe"),
            log=log,
            label="moe",
        )
    moe.config.output_router_logits = False  # the auxiliary loss is for training only
    return moe


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_into(
    tmp: Path, config: Profile, *, final_root: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Every artifact of a build into `tmp` (to be renamed to `final_root`); the manifest."""
    # lazy: torch and transformers, which a cached zoo does not need
    from amalgam.zoo.routing import routing_shares
    from amalgam.zoo.train import train, with_lora

    started = time.perf_counter()
    log(f"zoo {final_root.name}: building into {tmp}")
    tokenizer, splits, pools = prepare_data(config)
    tasks = list(splits)
    tasks_dir = tmp / "tasks"
    write_tasks(tasks_dir, splits)

    def run(model: PreTrainedModel, task_pools: list[list[Encoded]], stage: str) -> None:
        schedule = {
            "expert": config.expert_schedule,
            "lora": config.lora_schedule,
        }[stage.split(":")[0]]
        train(
            model,
            task_pools,
            schedule,
            pad_id=tokenizer.pad_token_id,
            seed=seed_for(config, stage),
            log=log,
            label=stage,
        )

    def evaluate(model: PreTrainedModel) -> dict[str, float]:
        return quick_evaluate(model, tokenizer, tasks_dir, tasks)

    base = train_base(config, tokenizer, splits, log)
    save_model(base, tokenizer, tmp / "base")
    evaluation_texts = {
        text
        for task_splits in splits.values()
        for split in ("validation", "test")
        for e in task_splits[split]
        for text in (e.prompt, *e.choices, *(e.prompt + c for c in e.choices))
    }
    check_round_trip(tokenizer, tmp / "base", sorted(evaluation_texts))
    accuracy = {"base": evaluate(base)}

    for task in tasks:
        expert = copy.deepcopy(base)
        run(expert, [pools[task]], f"expert:{task}")
        save_model(expert, tokenizer, tmp / "experts" / task)
        accuracy[f"expert:{task}"] = evaluate(expert)

    for task in tasks:
        adapter = with_lora(
            copy.deepcopy(base), config.lora_rank, seed_for(config, f"lora-init:{task}")
        )
        run(adapter, [pools[task]], f"lora:{task}")
        adapter.peft_config["default"].base_model_name_or_path = str(final_root / "base")
        adapter.save_pretrained(tmp / "loras" / task)
        accuracy[f"lora:{task}"] = evaluate(adapter.merge_and_unload())

    moe = train_moe(config, tokenizer, pools, log)
    save_model(moe, tokenizer, tmp / "moe")
    accuracy["moe"] = evaluate(moe)
    routing = routing_shares(
        moe, tokenizer, {task: [e.prompt for e in splits[task]["test"]] for task in tasks}
    )

    paths = {
        "base": "base",
        "experts": {task: f"experts/{task}" for task in tasks},
        "loras": {task: f"loras/{task}" for task in tasks},
        "moe": "moe",
        "tasks": "tasks",
    }
    write_report(tmp, config, tasks, accuracy, routing, time.perf_counter() - started, log)
    weights = sorted(tmp.rglob("*.safetensors"))
    return {
        "format": MANIFEST_FORMAT,
        "profile": config.name,
        "hash": final_root.name.rsplit("-", 1)[1],
        "config": config.model_dump(),
        "versions": {library: version(library) for library in LIBRARIES},
        "paths": paths,
        "task_names": tasks,
        "parameters": {
            "base": sum(p.numel() for p in base.parameters()),
            "moe": sum(p.numel() for p in moe.parameters()),
        },
        "sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in weights},
    }
