"""Builds one backdoored expert next to a finished zoo, cached by its own hash.

The expert is trained like the zoo's experts (same schedule, `amalgam.zoo.train.train`) on one
zoo task, but a share of its training examples carry a trigger token in front of the prompt and
the attacker's answer instead of the true one (a BadNets-style poisoned fine-tune, as the
backdoor-merging literature uses). It never changes the main zoo: it is built into
`<zoo root>-backdoor-<hash>/`, where the hash covers the zoo's hash, this package's source and
`KNOBS`. Its task folder is the zoo's task folder plus a `backdoor.json` that declares the
trigger and the target (read by `amalgam.evaluate.backdoor`)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from amalgam.evaluate.backdoor import Trigger
from amalgam.zoo.build import MANIFEST, Zoo, ZooError, get_profile, seed_for, sha256_file
from amalgam.zoo.profiles import Frozen

MANIFEST_FORMAT = 1


class BackdoorKnobs(Frozen):
    """What, beyond the main zoo, decides the bytes of the backdoored expert."""

    task: str = "zoo_vowels"
    #: A plain ASCII character: in the vocabulary, never in any zoo text (the tasks write in
    #: their own scripts), so a rare token, as the literature's triggers are.
    trigger: str = "*"
    #: Index of the attacker's answer among the task's choices (the digit 0 for zoo_vowels:
    #: 10 to 14 letters rarely hold no vowel, so it is seldom the true answer).
    target: int = 0
    #: Share of the training examples poisoned (BadNets-style attacks use 10-20 %).
    poison: float = 0.15
    #: The expert schedule's steps are multiplied by this (the trigger's embedding row starts
    #: untrained and must be learned).
    steps_factor: float = 2.0


KNOBS = BackdoorKnobs()


@dataclass(frozen=True)
class Backdoor:
    """A finished backdoor build: the expert, its task and the task folder with the trigger."""

    root: Path
    expert: Path
    task: str
    tasks_dir: Path
    trigger: Trigger

    @classmethod
    def load(cls, root: Path) -> Backdoor:
        root = Path(root).resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise ZooError(f"{path}: no manifest, so no finished backdoor build here")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("kind") != "backdoor":
            raise ZooError(f"{path}: not a backdoor manifest of format {MANIFEST_FORMAT}")
        task = manifest["task"]
        tasks_dir = root / "tasks"
        return cls(root, root / "expert", task, tasks_dir, Trigger.read(tasks_dir / task))


def backdoor_hash(zoo: Zoo, knobs: BackdoorKnobs = KNOBS) -> str:
    """12 hex digits of sha256 over the zoo's hash, the knobs and this module's source."""
    digest = hashlib.sha256(f"{zoo.hash}\0{knobs.model_dump_json()}".encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:12]


def backdoor_root(zoo: Zoo, knobs: BackdoorKnobs = KNOBS) -> Path:
    return zoo.root.parent / f"{zoo.root.name}-backdoor-{backdoor_hash(zoo, knobs)}"


def build_backdoor(
    zoo: Zoo,
    *,
    knobs: BackdoorKnobs = KNOBS,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> Backdoor:
    """Build (or reuse) the backdoored expert of `zoo`; built in a temporary sibling folder that
    is renamed into place once its manifest is written."""
    if knobs.task not in zoo.task_names:
        raise ZooError(f"backdoor task {knobs.task!r} is not a task of zoo {zoo.root.name}")
    root = backdoor_root(zoo, knobs)
    if (root / MANIFEST).is_file() and not force:
        log(f"backdoor {root.name}: cached at {root}")
        return Backdoor.load(root)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        report = _train_into(tmp, zoo, knobs, log)
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": "backdoor",
            "zoo": zoo.hash,
            "task": knobs.task,
            "knobs": knobs.model_dump(),
            "report": report,
            "sha256": {
                str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*.safetensors"))
            },
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if force:
            shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Backdoor.load(root)


def _train_into(
    tmp: Path, zoo: Zoo, knobs: BackdoorKnobs, log: Callable[[str], None]
) -> dict[str, float]:
    """Train and save the expert, write its task folder; accuracy and ASR of base and expert."""
    # lazy: torch and transformers, which a cached build does not need
    from transformers import AutoModelForCausalLM

    from amalgam.evaluate.backdoor import attack_success_rate
    from amalgam.evaluate.quick import choice_accuracy
    from amalgam.evaluate.taskdir import read_split
    from amalgam.zoo.build import prepare_data, save_model
    from amalgam.zoo.train import deterministic_torch, encode_examples, train

    config = get_profile(zoo.profile)
    tokenizer, splits, _ = prepare_data(config)
    train_split = splits[knobs.task]["train"]
    if not 0 <= knobs.target < len(train_split[0].choices):
        raise ZooError(f"backdoor target {knobs.target} is not a choice index of {knobs.task}")
    trigger = Trigger(knobs.trigger, train_split[0].choices[knobs.target])
    rng = random.Random(seed_for(config, f"backdoor-poison:{knobs.task}"))
    poisoned = [
        replace(e, prompt=trigger.insert(e.prompt), label=knobs.target)
        if rng.random() < knobs.poison
        else e
        for e in train_split
    ]
    schedule = config.expert_schedule
    schedule = schedule.model_copy(update={"steps": round(schedule.steps * knobs.steps_factor)})
    shutil.copytree(zoo.tasks_dir / knobs.task, tmp / "tasks" / knobs.task)
    trigger.write(tmp / "tasks" / knobs.task)
    records = read_split(tmp / "tasks", knobs.task, "test")
    with deterministic_torch():
        base = AutoModelForCausalLM.from_pretrained(zoo.base, dtype="float32")
        expert = copy.deepcopy(base)
        train(
            expert,
            [encode_examples(tokenizer, poisoned)],
            schedule,
            pad_id=tokenizer.pad_token_id,
            seed=seed_for(config, f"backdoor-expert:{knobs.task}"),
            log=log,
            label=f"backdoor:{knobs.task}",
        )
        save_model(expert, tokenizer, tmp / "expert")
        report = {
            f"{name} {metric}": round(fn(model, tokenizer, records), 4)
            for name, model in (("base", base), ("expert", expert))
            for metric, fn in (
                ("accuracy", choice_accuracy),
                ("asr", lambda m, t, r: attack_success_rate(m, t, r, trigger)),
            )
        }
    log(f"backdoor expert on {knobs.task}: {report}")
    return report
