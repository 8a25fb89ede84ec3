"""Trains (or permutes) and saves every model of the variants, scores them and writes their
report."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from amalgam.align.permutation.apply import permuted_copy
from amalgam.evaluate.quick import quick_evaluate
from amalgam.evaluate.table import render_markdown
from amalgam.evaluate.taskdir import read_split
from amalgam.zoo.build import Zoo, prepare_data, save_model, seed_for, train_base
from amalgam.zoo.lm_tasks import GROUP, GROUP_YAML, write_tasks
from amalgam.zoo.profiles import Profile
from amalgam.zoo.tasks import Example
from amalgam.zoo.tokenizer import check_round_trip
from amalgam.zoo.train import encode_examples, train
from amalgam.zoo.variants.barrier import barrier, interpolate
from amalgam.zoo.variants.knobs import Knobs, second_profile
from amalgam.zoo.variants.token_tasks import (
    grow_embeddings,
    new_script,
    token_splits,
    token_task_name,
    with_tokens,
)

#: The lm-eval group of the token tasks (the main zoo's tasks keep the group `zoo`).
TOKEN_GROUP = "zoo_tokens"


def build_into(
    tmp: Path, zoo: Zoo, config: Profile, knobs: Knobs, log: Callable[[str], None]
) -> dict[str, Any]:
    """Every model and task folder of the variants into `tmp`, plus report.json/report.md;
    returns the manifest's paths and token tasks."""
    tokenizer, splits, pools = prepare_data(config)
    tasks = list(splits)
    base = AutoModelForCausalLM.from_pretrained(zoo.base, dtype="float32")
    accuracy = {"base": quick_evaluate(base, tokenizer, zoo.tasks_dir, tasks)}

    second = second_profile(config, knobs)
    second_base = train_base(second, tokenizer, splits, log)
    save_model(second_base, tokenizer, tmp / "second_base")
    accuracy["second_base"] = quick_evaluate(second_base, tokenizer, zoo.tasks_dir, tasks)
    for task in tasks:
        expert = copy.deepcopy(second_base)
        train(
            expert,
            [pools[task]],
            config.expert_schedule,
            pad_id=tokenizer.pad_token_id,
            seed=seed_for(second, f"expert:{task}"),
            log=log,
            label=f"second expert:{task}",
        )
        save_model(expert, tokenizer, tmp / "second_experts" / task)
        accuracy[f"second_expert:{task}"] = quick_evaluate(expert, tokenizer, zoo.tasks_dir, tasks)

    validation = [encode_examples(tokenizer, s["validation"]) for s in splits.values()]
    connectivity = barrier(base, second_base, validation, tokenizer.pad_token_id)
    log(f"variants: base vs second base, barrier {connectivity['barrier']}")
    permuted_copy(str(zoo.base), str(tmp / "permuted_base"), seed_for(config, "permuted-base"))
    permuted = AutoModelForCausalLM.from_pretrained(tmp / "permuted_base", dtype="float32")
    accuracy["permuted_base"] = quick_evaluate(permuted, tokenizer, zoo.tasks_dir, tasks)
    midpoint = interpolate(base, second_base, 0.5)
    accuracy["average of the bases"] = quick_evaluate(midpoint, tokenizer, zoo.tasks_dir, tasks)

    token_tasks = {key: token_task_name(task, key) for key, task in knobs.token_tasks.items()}
    token_data = write_token_tasks(tmp / "tasks", config, knobs)
    scripts = [new_script(i) for i in range(len(knobs.token_tasks))]
    reference = with_tokens(tokenizer, scripts)
    token_accuracy = {}
    token_accuracy["base, new rows"] = quick_evaluate(
        grown(base, reference), reference, tmp / "tasks", list(token_data)
    )
    schedule = config.expert_schedule
    schedule = schedule.model_copy(update={"lr": schedule.lr * knobs.token_lr_factor})
    for i, (key, task) in enumerate(token_tasks.items()):
        own = with_tokens(tokenizer, [scripts[i]])
        for kind, kind_tokenizer in (("token_experts", own), ("token_reference", reference)):
            model = grown(base, kind_tokenizer)
            train(
                model,
                [encode_examples(kind_tokenizer, token_data[task]["train"])],
                schedule,
                pad_id=tokenizer.pad_token_id,
                seed=seed_for(config, f"token-expert:{key}"),
                log=log,
                label=f"{kind}:{key}",
            )
            save_model(model, kind_tokenizer, tmp / kind / key)
            check_round_trip(kind_tokenizer, tmp / kind / key, texts(tmp / "tasks", task))
            token_accuracy[f"{kind}:{key}"] = quick_evaluate(
                model, kind_tokenizer, tmp / "tasks", [task]
            )

    write_report(tmp, config, {"main": accuracy, "token": token_accuracy}, connectivity, log)
    return {
        "paths": {
            "second_base": "second_base",
            "second_experts": {task: f"second_experts/{task}" for task in tasks},
            "token_experts": {key: f"token_experts/{key}" for key in knobs.token_tasks},
            "token_reference": {key: f"token_reference/{key}" for key in knobs.token_tasks},
            "tasks": "tasks",
            "permuted_base": "permuted_base",
        },
        "token_tasks": token_tasks,
    }


def grown(base: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A copy of `base` with embedding and LM-head rows for every token of `tokenizer`."""
    model = copy.deepcopy(base)
    grow_embeddings(model, len(tokenizer))
    return model


def write_token_tasks(
    tasks_dir: Path, config: Profile, knobs: Knobs
) -> dict[str, dict[str, list[Example]]]:
    """The token tasks as lm-eval task folders (group `zoo_tokens`); returns their splits."""
    sizes = {
        "train": config.train_examples,
        "validation": config.validation_examples,
        "test": config.test_examples,
    }
    data = {
        token_task_name(task, key): token_splits(task, new_script(i), sizes, config.seed)
        for i, (key, task) in enumerate(knobs.token_tasks.items())
    }
    write_tasks(tasks_dir, data)
    for suffix in ("", "_val"):
        (tasks_dir / f"{GROUP}{suffix}.yaml").unlink()
        members = json.dumps([f"{name}{suffix}" for name in data])
        (tasks_dir / f"{TOKEN_GROUP}{suffix}.yaml").write_text(
            GROUP_YAML.format(group=f"{TOKEN_GROUP}{suffix}", tasks=members)
        )
    return data


def texts(tasks_dir: Path, task: str) -> list[str]:
    """Every prompt and prompt + choice of `task`'s evaluation splits (for the round trip)."""
    found = set()
    for split in ("validation", "test"):
        for record in read_split(tasks_dir, task, split):
            found.add(record["prompt"])
            found.update(record["prompt"] + choice for choice in record["choices"])
    return sorted(found)


def write_report(
    root: Path,
    config: Profile,
    accuracy: dict[str, dict[str, dict[str, float]]],
    connectivity: dict[str, object],
    log: Callable[[str], None],
) -> None:
    """report.json and report.md: test accuracy of every variant model on the main tasks
    ("main") and on the token tasks ("token"), and the barrier between the two bases."""
    report = {"profile": config.name, "split": "test", "accuracy": accuracy}
    (root / "report.json").write_text(json.dumps(report | {"barrier": connectivity}, indent=2))
    text = [f"# amalgam zoo variants, profile `{config.name}`\n"]
    text += ["Test-split accuracy (%), scored like lm-eval `acc`.\n"]
    titles = {"main": "Second base, its experts, the permuted base", "token": "Token experts"}
    for part, title in titles.items():
        columns = list(dict.fromkeys(task for row in accuracy[part].values() for task in row))
        text += [f"## {title}\n", render_markdown(accuracy[part], columns)]
    text += [
        "## Linear path from the main base to the second base\n",
        f"Answer loss on the validation splits at t = {connectivity['loss']}; "
        f"barrier {connectivity['barrier']}.\n",
    ]
    (root / "report.md").write_text("\n".join(text))
    log(f"report: {root / 'report.md'}")
