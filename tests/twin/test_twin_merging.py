"""Twin-Merging: SVD truncation, the per-input mix, the built folder (bytes, resume after a
kill), the router, evaluation of a Twin folder, and bad input through the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions
from amalgam.evaluate.quick import choice_correct
from amalgam.evaluate.score import score_model
from amalgam.evaluate.taskdir import read_split
from amalgam.recipe import EvaluateSpec, ModelSpec, Recipe
from amalgam.twin.build import TwinResult, build_twin
from amalgam.twin.model import TwinModel
from amalgam.twin.router import train_router
from amalgam.twin.spec import TwinSpec
from amalgam.twin.svd import mix, truncated_svd
from tests.faults.kills import KILLED, process_env, run_process
from tests.helpers import run_cli

TASKS = ["zoo_sort", "zoo_vowels"]
FULL = 64  # the tiny zoo's largest min(m, n): every tensor kept exactly


def recipe(zoo: Any) -> Recipe:
    models = [ModelSpec(uri=str(zoo.experts[t]), name=t) for t in TASKS]
    return Recipe(
        method="task_arithmetic",
        base=str(zoo.base),
        models=models,
        params={"lambda": 0.3},
        dtype="float32",
    )


def spec(zoo: Any, rank: int = FULL, **kw: Any) -> TwinSpec:
    return TwinSpec(rank=rank, tasks_dir=str(zoo.tasks_dir), router_limit=16, **kw)


def build(zoo: Any, out: Path, rank: int = FULL) -> TwinResult:
    opts = MergeOptions(device="cpu", threads=1)
    return build_twin(recipe(zoo), spec(zoo, rank), str(out), options=opts)


@pytest.fixture(scope="module")
def built(zoo_tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TwinResult]:
    out = tmp_path_factory.mktemp("twin") / "twin"
    return out, build(zoo_tiny, out)


def test_rank_rules() -> None:
    by_share = TwinSpec(share=0.1, tasks_dir="t")
    assert [by_share.rank_of(s) for s in [(160, 64), (32, 64), (5, 9)]] == [6, 3, 1]
    by_rank = TwinSpec(rank=40, tasks_dir="t")
    assert [by_rank.rank_of(s) for s in [(160, 64), (32, 64)]] == [40, 32]


def test_truncation_error_is_the_dropped_singular_values() -> None:
    a = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd(a.numpy().astype(np.float64), compute_uv=False)
    for rank in (1, 3, 7):
        us, v = truncated_svd(a, rank)
        assert us.shape == (12, rank) and v.shape == (rank, 7)
        err = float(((a.double() - (us @ v).double()) ** 2).sum())
        assert err == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-4, abs=1e-9)
    for bad in (0, 8):
        with pytest.raises(ValueError):
            truncated_svd(a, bad)


def test_mix_is_the_weighted_sum_of_low_rank_deltas() -> None:
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(5, 4, generator=g)
    factors = [(torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)) for _ in range(3)]
    w = torch.tensor([0.2, 0.5, 0.3])
    naive = shared.clone()
    for t in range(3):  # entry by entry, as the paper writes it
        us, v = factors[t]
        for i in range(5):
            for j in range(4):
                naive[i, j] += w[t] * sum(us[i, k] * v[k, j] for k in range(2))
    torch.testing.assert_close(mix(shared, w, factors), naive, rtol=1e-5, atol=1e-5)


def test_one_hot_router_at_full_rank_is_the_expert(
    built: tuple[Path, TwinResult], zoo_tiny: Any
) -> None:
    from transformers import AutoModelForCausalLM

    twin = TwinModel(built[0])
    records = read_split(zoo_tiny.tasks_dir, "zoo_sort", "test")[:8]
    ids = [twin.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    batch = torch.tensor([row[: min(map(len, ids))] for row in ids])
    for index, task in enumerate(TASKS):
        expert = AutoModelForCausalLM.from_pretrained(zoo_tiny.experts[task]).eval()
        twin.load_weights(torch.nn.functional.one_hot(torch.tensor(index), len(TASKS)).float())
        with torch.no_grad():
            got, want = twin.model(input_ids=batch).logits, expert(input_ids=batch).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_byte_accounting_is_exact(built: tuple[Path, TwinResult], zoo_tiny: Any) -> None:
    out, result = built
    on_disk = {
        p.name: p.stat().st_size
        for p in out.iterdir()
        if p.suffix in (".safetensors", ".json") and p.name in result.files
    }
    assert on_disk == result.files and result.stored_bytes == sum(on_disk.values())
    assert set(result.files) >= {"model.safetensors", "router.safetensors", "twin.json"}
    manifest = json.loads((out / "twin.json").read_text())
    # independent count: factor payload from the tensor shapes, header from the file itself
    payload = 0
    for entry in manifest["tensors"].values():
        shape = entry["shape"]
        if len(shape) == 2:
            k = min(FULL, *shape)
            payload += len(TASKS) * k * (shape[0] + shape[1]) * 4
        else:
            payload += len(TASKS) * shape[0] * 4
    for name in manifest["factor_files"]:
        header = struct.unpack("<Q", (out / name).read_bytes()[:8])[0]
        payload -= result.files[name] - 8 - header
    assert payload == 0
    assert result.experts_bytes == sum(
        (Path(zoo_tiny.experts[t]) / "model.safetensors").stat().st_size for t in TASKS
    )


def test_content_hash_tells_the_twin_folder_from_its_shared_model(
    built: tuple[Path, TwinResult],
) -> None:
    out = built[0]
    with open_checkpoint(str(out)) as twin, open_checkpoint(f"{out}.shared") as shared:
        assert twin.files == shared.files == ["model.safetensors"]
        assert twin.content_hash() != shared.content_hash()  # evaluation caches key on it


def test_router_is_deterministic_and_routes_tasks(
    built: tuple[Path, TwinResult], zoo_tiny: Any
) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.arange(40) % 3
    a, b = train_router(x, y, ["a", "b", "c"]), train_router(x, y, ["a", "b", "c"])
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    weights = a.weights(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(40))
    twin = TwinModel(built[0])
    for index, task in enumerate(TASKS):
        prompts = [r["prompt"] for r in read_split(zoo_tiny.tasks_dir, task, "test")[:20]]
        assert (twin.route(prompts).argmax(-1) == index).float().mean() >= 0.9
    assert built[1].router_accuracy >= 0.9


def test_evaluate_scores_each_example_with_its_own_mix(
    built: tuple[Path, TwinResult], zoo_tiny: Any
) -> None:
    evaluate = EvaluateSpec(
        tasks_dir=str(zoo_tiny.tasks_dir), engine="quick", limit=12, device="cpu"
    )
    result = score_model(str(built[0]), evaluate, TASKS)
    twin = TwinModel(built[0])
    for task in TASKS:
        want = []
        for record in read_split(zoo_tiny.tasks_dir, task, "test")[:12]:  # one at a time
            twin.load_weights(twin.route([record["prompt"]])[0])
            want += choice_correct(twin.model, twin.tokenizer, [record])
        assert result.tasks[task].correct == want


def test_a_killed_build_resumes_from_the_shared_merge(
    zoo_tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Killed after the shared merge, the build resumes through the CLI from that merge."""
    out = tmp_path / "twin"
    script = (
        "import sys, json\n"
        "from amalgam.recipe import Recipe\n"
        "from amalgam.twin.build import build_twin\n"
        "from amalgam.twin.spec import TwinSpec\n"
        "from amalgam.engine import MergeOptions\n"
        "r, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "opts = MergeOptions(device='cpu', threads=1)\n"
        "build_twin(Recipe(**r), TwinSpec(**s), sys.argv[3], options=opts)\n"
    )
    args = [recipe(zoo_tiny).model_dump_json(), spec(zoo_tiny, 4).model_dump_json(), str(out)]
    env = process_env(tmp_path / "home", kill="amalgam.twin.build:_train:1")
    done = run_process(["-c", script, *args], env)
    assert done.code == KILLED, done.tail
    assert (tmp_path / "twin.shared" / "model.safetensors").is_file() and not out.exists()
    (tmp_path / "recipe.yaml").write_text(args[0])  # JSON is YAML
    cli = ["twin", str(tmp_path / "recipe.yaml"), "--output", str(out), "--rank", "4"]
    cli += ["--tasks-dir", str(zoo_tiny.tasks_dir), "--router-limit", "16", "--json"]
    code, stdout, err = run_cli(cli, monkeypatch, capsys)
    resumed = json.loads(stdout)
    assert code == 0 and resumed["shared_reused"] and not resumed["skipped"], err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert resumed["files"] == {
        p.name: p.stat().st_size for p in out.iterdir() if p.name in resumed["files"]
    }
    code, stdout, _ = run_cli(cli, monkeypatch, capsys)
    again = json.loads(stdout)
    assert code == 0 and again["skipped"] and again["files"] == resumed["files"]


def test_the_cli_evaluates_a_twin_folder(
    built: tuple[Path, TwinResult], zoo_tiny: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    args = ["evaluate", str(built[0]), "--tasks", "zoo_sort", "--limit", "6"]
    code, out, err = run_cli([*args, "--tasks-dir", str(zoo_tiny.tasks_dir)], monkeypatch, capsys)
    correct = TwinModel(built[0]).correct(read_split(zoo_tiny.tasks_dir, "zoo_sort", "test")[:6])
    assert code == 0, err
    assert built[0].name in out and f"{sum(correct) / 6:.4f}" in out


def test_bad_input_is_one_error_line(
    zoo_tiny: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    built: tuple[Path, TwinResult],
) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe(zoo_tiny).model_dump_json())
    empty = tmp_path / "tasks"
    empty.mkdir()
    common = ["twin", str(path), "--output", str(tmp_path / "o")]
    cases = {
        "give exactly one of rank and share": [*common, "--tasks-dir", str(zoo_tiny.tasks_dir)],
        "--rank: ": [*common, "--rank", "0", "--tasks-dir", str(zoo_tiny.tasks_dir)],
        "rank 65 is above min(m, n) = 64": [
            *common,
            "--rank",
            "65",
            "--tasks-dir",
            str(zoo_tiny.tasks_dir),
        ],
        "router data: task 'zoo_sort' has no train split": [
            *common,
            "--rank",
            "2",
            "--tasks-dir",
            str(empty),
        ],
        "task nope: not a task folder": [
            "evaluate",
            str(built[0]),
            "--tasks",
            "nope",
            "--tasks-dir",
            str(zoo_tiny.tasks_dir),
        ],
    }
    for message, args in cases.items():
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not (tmp_path / "o").exists()


def test_the_documented_example_runs(
    zoo_tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/twin.md's recipe and Python example, as written, over the tiny zoo."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "twin.md").read_text()
    recipe_yaml = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    example = doc.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").symlink_to(zoo_tiny.root)
    (tmp_path / "recipe.yaml").write_text(recipe_yaml)
    scope: dict[str, Any] = {}
    exec(compile(example, "docs/twin.md", "exec"), scope)
    assert scope["result"].stored_bytes == sum(scope["result"].files.values())
    assert scope["weights"].shape == (1, 2)
    assert set(scope["scores"]) == {"zoo_sort"}
