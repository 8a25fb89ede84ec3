"""The tiny zoo build: layout, cache, determinism, tokenizer, experts, LoRAs and MoE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo.conftest import zoo_home

from amalgam.evaluate import quick_evaluate, read_split
from amalgam.zoo import PROFILES, Zoo, ZooError, build_zoo
from amalgam.zoo.build import MANIFEST, get_profile, prepare_data, sha256_file, train_base, zoo_hash
from amalgam.zoo.report import MIN_EXPERT_GAIN
from amalgam.zoo.tasks import TASKS
from amalgam.zoo.tokenizer import check_round_trip


def report(zoo: Zoo) -> dict:
    return json.loads((zoo.root / "report.json").read_text())


def test_layout_and_manifest(zoo_tiny: Zoo) -> None:
    assert zoo_tiny.root.name == f"tiny-{zoo_hash(PROFILES['tiny'])}"
    assert zoo_tiny.task_names == list(TASKS) and len(zoo_tiny.task_names) >= 8
    assert set(zoo_tiny.experts) == set(zoo_tiny.loras) == set(TASKS)
    for model in (zoo_tiny.base, zoo_tiny.moe, *zoo_tiny.experts.values()):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in model.iterdir()
        }
    for adapter in zoo_tiny.loras.values():
        assert (adapter / "adapter_model.safetensors").is_file()
    for task in zoo_tiny.task_names:
        folder = zoo_tiny.tasks_dir / task
        assert {f"{task}.yaml", f"{task}_val.yaml", "test.jsonl", "validation.jsonl"} <= {
            p.name for p in folder.iterdir()
        }
    manifest = json.loads((zoo_tiny.root / MANIFEST).read_text())
    for name, digest in manifest["sha256"].items():
        assert sha256_file(zoo_tiny.root / name) == digest, name
    assert Zoo.load(zoo_tiny.root) == zoo_tiny
    assert not list(zoo_tiny.root.parent.glob(f".{zoo_tiny.root.name}.tmp-*"))


def test_a_finished_build_is_returned_from_the_cache(zoo_tiny: Zoo) -> None:
    logs: list[str] = []
    assert build_zoo(zoo_home(), profile="tiny", log=logs.append) == zoo_tiny
    assert logs == [f"zoo {zoo_tiny.root.name}: cached at {zoo_tiny.root}"]


def test_hash_names_the_profile_and_is_stable() -> None:
    assert zoo_hash(PROFILES["tiny"]) == zoo_hash(PROFILES["tiny"])
    assert zoo_hash(PROFILES["tiny"]) != zoo_hash(PROFILES["full"])


def test_base_training_gives_the_same_bytes(zoo_tiny: Zoo, tmp_path: Path) -> None:
    config = get_profile("tiny")
    tokenizer, splits, _ = prepare_data(config)
    train_base(config, tokenizer, splits, log=lambda _: None).save_pretrained(tmp_path)
    manifest = json.loads((zoo_tiny.root / MANIFEST).read_text())
    assert (
        sha256_file(tmp_path / "model.safetensors") == manifest["sha256"]["base/model.safetensors"]
    )


def test_saved_tokenizers_give_the_built_ids_on_every_evaluation_string(zoo_tiny: Zoo) -> None:
    built, _, _ = prepare_data(get_profile("tiny"))
    texts = set()
    for task in zoo_tiny.task_names:
        for split in ("validation", "test"):
            for record in read_split(zoo_tiny.tasks_dir, task, split):
                texts.add(record["prompt"])
                texts.update(record["prompt"] + choice for choice in record["choices"])
    for model in (zoo_tiny.base, zoo_tiny.moe, *zoo_tiny.experts.values()):
        check_round_trip(built, model, sorted(texts))


def test_report_gains_are_own_task_accuracy_over_the_base(zoo_tiny: Zoo) -> None:
    accuracy, gains = report(zoo_tiny)["accuracy"], report(zoo_tiny)["own_task_gain"]
    for kind in ("expert", "lora"):
        assert gains[kind] == {
            task: accuracy[f"{kind}:{task}"][task] - accuracy["base"][task]
            for task in zoo_tiny.task_names
        }


@pytest.mark.slow
def test_every_full_profile_expert_beats_the_base_on_its_own_task() -> None:
    """The tiny profile is too small to learn every task, so the claim the benchmarks rely on
    is checked on the full profile (built once, about 8 minutes, then cached)."""
    gains = report(build_zoo(zoo_home(), profile="full"))["own_task_gain"]["expert"]
    weak = {task: gain for task, gain in gains.items() if gain < MIN_EXPERT_GAIN}
    assert not weak, f"experts not clearly better than the base: {weak}"


def test_report_matches_the_saved_expert(zoo_tiny: Zoo) -> None:
    task = zoo_tiny.task_names[0]
    folder = zoo_tiny.experts[task]
    model = AutoModelForCausalLM.from_pretrained(folder)
    scores = quick_evaluate(
        model, AutoTokenizer.from_pretrained(folder), zoo_tiny.tasks_dir, [task]
    )
    assert scores[task] == report(zoo_tiny)["accuracy"][f"expert:{task}"][task]


def test_lora_adapters_load_and_merge(zoo_tiny: Zoo) -> None:
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.base)
    accuracy = report(zoo_tiny)["accuracy"]
    for task, adapter in zoo_tiny.loras.items():
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(zoo_tiny.base)
        base = AutoModelForCausalLM.from_pretrained(zoo_tiny.base)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        assert type(merged).__name__ == "LlamaForCausalLM"
        scores = quick_evaluate(merged, tokenizer, zoo_tiny.tasks_dir, [task])
        assert scores[task] == accuracy[f"lora:{task}"][task]


def test_moe_loads_as_mixtral(zoo_tiny: Zoo) -> None:
    model = AutoModelForCausalLM.from_pretrained(zoo_tiny.moe)
    assert type(model).__name__ == "MixtralForCausalLM"
    shape = PROFILES["tiny"].moe
    assert model.config.num_local_experts == shape.experts
    assert model.config.num_experts_per_tok == shape.experts_per_token
    tokenizer = AutoTokenizer.from_pretrained(zoo_tiny.moe)
    scores = quick_evaluate(model, tokenizer, zoo_tiny.tasks_dir, zoo_tiny.task_names)
    assert scores == report(zoo_tiny)["accuracy"]["moe"]


def test_an_interrupted_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def interrupt(message: str) -> None:
        if "building into" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path, profile="tiny", log=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_unknown_profile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match=r"'huge'.*full.*tiny"):
        build_zoo(tmp_path, profile="huge")
