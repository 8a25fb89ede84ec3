"""The tiny zoo's alignment variants: layout, cache, hash, determinism, second base, tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo.conftest import zoo_home

from amalgam.evaluate import quick_evaluate, read_split
from amalgam.zoo import Zoo, ZooError
from amalgam.zoo.build import MANIFEST, get_profile, prepare_data, sha256_file, source_files
from amalgam.zoo.tasks import TASKS
from amalgam.zoo.train import encode_examples
from amalgam.zoo.variants import KNOBS, Knobs, Variants, build_variants, variants_root
from amalgam.zoo.variants.barrier import barrier, interpolate
from amalgam.zoo.variants.build import variants_hash
from amalgam.zoo.variants.token_tasks import new_script
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def variants(zoo_tiny: Zoo) -> Variants:
    return build_variants(zoo_tiny, log=lambda _: None)


def manifest(variants: Variants) -> dict:
    return json.loads((variants.root / MANIFEST).read_text())


def report(variants: Variants) -> dict:
    return json.loads((variants.root / "report.json").read_text())


def test_layout_and_manifest(zoo_tiny: Zoo, variants: Variants) -> None:
    assert variants.root == variants_root(zoo_tiny)
    assert variants.root.parent == zoo_tiny.root.parent
    assert variants.root.name.startswith(f"{zoo_tiny.root.name}-variants-")
    assert set(variants.second_experts) == set(TASKS)
    assert set(variants.token_experts) == set(variants.token_reference) == set(KNOBS.token_tasks)
    models = [
        variants.second_base,
        variants.permuted_base,
        *variants.second_experts.values(),
        *variants.token_experts.values(),
        *variants.token_reference.values(),
    ]
    for model in models:
        assert model.is_absolute()
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in model.iterdir()
        }
    for task in variants.token_tasks.values():
        assert {f"{task}.yaml", f"{task}_val.yaml", "test.jsonl", "validation.jsonl"} <= {
            p.name for p in (variants.tasks_dir / task).iterdir()
        }
    recorded = manifest(variants)["sha256"]
    assert len(recorded) == len(models)
    for name, digest in recorded.items():
        assert sha256_file(variants.root / name) == digest, name
    assert Variants.load(variants.root) == variants
    assert not list(variants.root.parent.glob(f".{variants.root.name}.tmp-*"))


def test_a_finished_build_is_returned_from_the_cache(zoo_tiny: Zoo, variants: Variants) -> None:
    logs: list[str] = []
    assert build_variants(zoo_tiny, log=logs.append) == variants
    assert logs == [f"variants {variants.root.name}: cached at {variants.root}"]


def test_the_variants_leave_the_main_zoo_hash_alone(zoo_tiny: Zoo) -> None:
    assert not [p for p in source_files() if "variants" in p.parts]
    changed = Knobs(token_lr_factor=KNOBS.token_lr_factor + 1)
    assert variants_hash(zoo_tiny, changed) != variants_hash(zoo_tiny)
    other_zoo = dataclasses.replace(zoo_tiny, hash="0" * 12)
    assert variants_hash(other_zoo) != variants_hash(zoo_tiny)


def test_a_rebuild_gives_the_same_bytes(zoo_tiny: Zoo, variants: Variants, tmp_path: Path) -> None:
    """The whole build again, beside a stand-in for the zoo root in tmp_path."""
    elsewhere = dataclasses.replace(zoo_tiny, root=tmp_path / zoo_tiny.root.name)
    again = build_variants(elsewhere, log=lambda _: None)
    assert again.root.parent == tmp_path
    assert manifest(again)["sha256"] == manifest(variants)["sha256"]
    assert report(again)["accuracy"] == report(variants)["accuracy"]


def test_the_second_base_is_independent_of_the_first(zoo_tiny: Zoo, variants: Variants) -> None:
    first = load_file(zoo_tiny.base / "model.safetensors")
    second = load_file(variants.second_base / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[k].shape == second[k].shape for k in first)
    assert not any(torch.equal(first[k], second[k]) for k in first if "norm" not in k)
    found = report(variants)
    assert found["barrier"]["barrier"] > 0.1
    assert found["barrier"]["loss"]["0.5"] > max(
        found["barrier"]["loss"]["0.0"], found["barrier"]["loss"]["1.0"]
    )
    # Its experts train on the main zoo's data: each beats the second base on its own task.
    accuracy = found["accuracy"]["main"]
    gains = {t: accuracy[f"second_expert:{t}"][t] - accuracy["second_base"][t] for t in TASKS}
    assert sum(gains.values()) / len(gains) > 0.05, gains


def test_the_permuted_base_is_the_base_in_another_basis(zoo_tiny: Zoo, variants: Variants) -> None:
    base = load_file(zoo_tiny.base / "model.safetensors")
    permuted = load_file(variants.permuted_base / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], permuted[k])}
    assert any(".mlp." in k for k in changed) and any(".self_attn." in k for k in changed)
    assert "model.embed_tokens.weight" not in changed  # the residual stream stays in place
    prompts = [r["prompt"] for r in read_split(zoo_tiny.tasks_dir, zoo_tiny.task_names[0], "test")]
    tokenizer = AutoTokenizer.from_pretrained(variants.permuted_base)
    ids = tokenizer(prompts[:8], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(zoo_tiny.base)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(variants.permuted_base)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    accuracy = report(variants)["accuracy"]["main"]
    assert accuracy["permuted_base"] == accuracy["base"]


def test_barrier_is_zero_on_the_same_model(zoo_tiny: Zoo) -> None:
    tokenizer, splits, _ = prepare_data(get_profile("tiny"))
    model = AutoModelForCausalLM.from_pretrained(zoo_tiny.base)
    pools = [encode_examples(tokenizer, s["validation"][:16]) for s in splits.values()]
    found = barrier(model, model, pools, tokenizer.pad_token_id)
    assert found["barrier"] == 0.0
    assert len(set(found["loss"].values())) == 1
    assert torch.equal(
        interpolate(model, model, 0.5).model.embed_tokens.weight, model.model.embed_tokens.weight
    )


def test_token_experts_add_their_own_script_as_tokens(zoo_tiny: Zoo, variants: Variants) -> None:
    base = AutoTokenizer.from_pretrained(zoo_tiny.base)
    scripts = {key: new_script(i) for i, key in enumerate(KNOBS.token_tasks)}
    reference_vocab = None
    for key, script in scripts.items():
        own = AutoTokenizer.from_pretrained(variants.token_experts[key])
        reference = AutoTokenizer.from_pretrained(variants.token_reference[key])
        assert len(own) == len(base) + len(script)
        assert len(reference) == len(base) + sum(len(s) for s in scripts.values())
        assert all(base.convert_tokens_to_ids(c) == base.unk_token_id for c in script)
        # Base order first, then the expert's own script (in the reference: every script).
        assert own.convert_tokens_to_ids(list(script)) == list(range(len(base), len(own)))
        for other in set(scripts) - {key}:
            assert own.convert_tokens_to_ids(scripts[other][0]) == own.unk_token_id
        assert reference.get_vocab() == (reference_vocab or reference.get_vocab())
        reference_vocab = reference.get_vocab()
        model = AutoModelForCausalLM.from_pretrained(variants.token_experts[key])
        assert model.get_input_embeddings().weight.shape[0] == len(own)
        assert model.get_output_embeddings().weight.shape[0] == len(own)


def test_token_tasks_ask_the_zoo_prompts_in_a_new_script(variants: Variants) -> None:
    for i, (key, name) in enumerate(variants.token_tasks.items()):
        task = TASKS[KNOBS.token_tasks[key]]
        records = read_split(variants.tasks_dir, name, "test")
        script = new_script(i)
        for record in records:
            assert set(record["prompt"]) <= set(task.script)
            assert all(set(choice) <= set(script) for choice in record["choices"])
            plain = [c.translate(str.maketrans(script, task.script)) for c in record["choices"]]
            assert task.plain(plain[record["label"]])  # an answer the zoo task could give
    group = (variants.tasks_dir / "zoo_tokens.yaml").read_text()
    assert all(name in group for name in variants.token_tasks.values())
    assert not (variants.tasks_dir / "zoo.yaml").exists()


def test_token_experts_learn_their_task_and_match_the_report(variants: Variants) -> None:
    accuracy = report(variants)["accuracy"]["token"]
    for key, task in variants.token_tasks.items():
        for kind, folder in (
            ("token_experts", variants.token_experts[key]),
            ("token_reference", variants.token_reference[key]),
        ):
            model = AutoModelForCausalLM.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            scores = quick_evaluate(model, tokenizer, variants.tasks_dir, [task])
            assert scores[task] == accuracy[f"{kind}:{key}"][task]
            assert scores[task] > accuracy["base, new rows"][task] + 0.1, (kind, key)


def test_an_interrupted_build_leaves_nothing_behind(zoo_tiny: Zoo, tmp_path: Path) -> None:
    def interrupt(message: str) -> None:
        if "building into" in message:
            raise KeyboardInterrupt

    elsewhere = dataclasses.replace(zoo_tiny, root=tmp_path / zoo_tiny.root.name)
    with pytest.raises(KeyboardInterrupt):
        build_variants(elsewhere, log=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_the_variants_beside_the_zoo(
    variants: Variants, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = ["zoo", "build", "--profile", "tiny", "--variants", "--out", str(zoo_home())]
    code, out, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0
    assert out.split() == [
        str(variants.root.parent / variants.root.name.split("-variants-")[0]),
        str(variants.root),
    ]


def test_loading_a_folder_without_a_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="no finished variants build"):
        Variants.load(tmp_path)
