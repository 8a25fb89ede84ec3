"""The connectivity report on the tiny zoo: a model against itself, against a copy with its MLP
units permuted (same function, far in weight space), and the report's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amalgam.align.connectivity import (
    ConnectivityError,
    Curve,
    PathPoint,
    barrier,
    check_interpolable,
    linear_path,
    path_ts,
    write_report,
)
from amalgam.align.copies import write_aligned_copy
from amalgam.checkpoint import open_checkpoint
from amalgam.device import load_causal_lm
from amalgam.evaluate.perplexity import sequence_nll, task_texts, token_ids
from amalgam.zoo import Zoo, build_zoo
from tests.helpers import llama_tensors, run_cli, write_model
from tests.zoo.conftest import zoo_home

TASKS = ["zoo_caesar", "zoo_sort"]
LIMIT = 24


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return build_zoo(zoo_home(), profile="tiny", log=lambda _: None)


def permute_mlp(src: Path, out: Path, seed: int = 0) -> Path:
    """A copy of ``src`` with each layer's MLP units shuffled: the same function."""
    ckpt = open_checkpoint(str(src))
    size = ckpt.shape("model.layers.0.mlp.up_proj.weight")[0]
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith(("mlp.up_proj.weight", "mlp.gate_proj.weight")):
            return tensor[perm]
        if name.endswith("mlp.down_proj.weight"):
            return tensor[:, perm]
        return tensor

    write_aligned_copy(ckpt, str(out), transform)
    return out


def test_path_ts_and_barrier_by_hand():
    assert path_ts() == [i / 10 for i in range(11)]
    # ends 1.0 and 3.0: chord at t=0.5 is 2.0, the loss 2.5 there is 0.5 above it
    assert barrier([0.0, 0.5, 1.0], [1.0, 2.5, 3.0]) == pytest.approx(0.5)
    # a path below its chord has no barrier: the ends bound it
    assert barrier([0.0, 0.5, 1.0], [1.0, 0.5, 1.0]) == pytest.approx(0.0)


def test_model_against_itself_is_flat(zoo: Zoo):
    curve = linear_path(str(zoo.base), str(zoo.base), zoo.tasks_dir, TASKS, points=3, limit=LIMIT)
    losses = [p.loss for p in curve.points]
    assert losses == pytest.approx([losses[0]] * 3, abs=1e-5)
    assert curve.barrier == pytest.approx(0.0, abs=1e-5)
    # the t = 0 point is the model's own answer-token NLL, computed here independently
    model, tokenizer = load_causal_lm(zoo.base, "cpu")
    total, count = sequence_nll(
        model, token_ids(tokenizer, task_texts(zoo.tasks_dir, TASKS, "test", LIMIT))
    )
    assert losses[0] == pytest.approx(total / count, rel=1e-5)


def test_permuted_copy_has_a_barrier(zoo: Zoo, tmp_path: Path):
    permuted = permute_mlp(zoo.base, tmp_path / "permuted")
    curve = linear_path(str(zoo.base), str(permuted), zoo.tasks_dir, TASKS, limit=LIMIT)
    first, mid, last = curve.points[0], curve.midpoint, curve.points[-1]
    # the permuted copy computes the same function: both ends score the same
    assert last.loss == pytest.approx(first.loss, rel=1e-4)
    assert last.tasks == first.tasks
    # but the average of the two mixes unrelated units: the loss rises between them
    assert curve.barrier > 0.1
    assert mid.loss - first.loss == pytest.approx(curve.barrier, rel=0.5)

    files = write_report([curve], tmp_path / "report", title="base vs permuted", tasks=TASKS)
    assert [f.name for f in files] == ["connectivity.json", "connectivity.md", "connectivity.png"]
    data = json.loads(files[0].read_text())
    assert data["tasks"] == TASKS
    assert data["curves"][0]["barrier"] == pytest.approx(curve.barrier)
    assert len(data["curves"][0]["points"]) == 11
    assert f"| naive | {curve.barrier:.3f} |" in files[1].read_text()
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_lists_every_point(tmp_path: Path):
    points = [PathPoint(t, 1.0 + t * (1 - t), 0.5) for t in path_ts(5)]
    report = write_report([Curve("a", points), Curve("b", points)], tmp_path, title="x")
    text = report[1].read_text()
    assert text.count("\n| 0.") == 4 and "| 1.0 |" in text
    assert "| a | 0.250 |" in text and "| b | 0.250 |" in text


def test_different_shapes_are_refused_naming_the_tensor(tmp_path: Path):
    tensors = llama_tensors()
    write_model(tmp_path / "a", tensors)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(16, 8, dtype=torch.bfloat16)
    write_model(tmp_path / "b", tensors)
    with pytest.raises(ConnectivityError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: shape"):
        check_interpolable(
            open_checkpoint(str(tmp_path / "a")), open_checkpoint(str(tmp_path / "b"))
        )


def test_cli_writes_the_report(zoo: Zoo, tmp_path: Path, monkeypatch, capsys):
    permuted = permute_mlp(zoo.base, tmp_path / "permuted")
    out = tmp_path / "report"
    args = ["align", str(zoo.base), str(permuted), "--report", str(out)]
    args += ["--tasks-dir", str(zoo.tasks_dir), "--tasks", "zoo_sort", "--limit", "8"]
    code, stdout, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0
    data = json.loads((out / "connectivity.json").read_text())
    assert data["tasks"] == ["zoo_sort"] and data["limit"] == 8
    assert f"naive: barrier {data['curves'][0]['barrier']:.3f} nats" in stdout
    assert (out / "connectivity.png").is_file()


def test_cli_refuses_an_aligner_that_writes_no_aligned_b(
    zoo: Zoo, tmp_path: Path, monkeypatch, capsys
):
    args = [
        "align",
        str(zoo.base),
        str(zoo.base),
        "--report",
        str(tmp_path / "r"),
        "--align",
        "pleas",
    ]
    code, _, stderr = run_cli([*args, "--tasks-dir", str(zoo.tasks_dir)], monkeypatch, capsys)
    assert code == 2
    assert stderr.startswith("error: --align pleas: not a permutation aligner")
    assert not (tmp_path / "r").exists()


def test_cli_with_weight_matching_removes_the_permutation_barrier(
    zoo: Zoo, tmp_path: Path, monkeypatch, capsys
):
    permuted = permute_mlp(zoo.base, tmp_path / "permuted")
    out = tmp_path / "report"
    args = ["align", str(zoo.base), str(permuted), "--report", str(out), "--align"]
    args += ["weight_matching", "--tasks-dir", str(zoo.tasks_dir), "--tasks", "zoo_sort"]
    code, stdout, _ = run_cli([*args, "--limit", "16"], monkeypatch, capsys)
    assert code == 0, stdout
    naive, aligned = json.loads((out / "connectivity.json").read_text())["curves"]
    assert aligned["label"] == "weight_matching"
    assert naive["barrier"] > 0.1
    assert aligned["barrier"] == pytest.approx(0.0, abs=1e-3)  # the permutation is undone
    assert (out / "aligned").is_dir()
