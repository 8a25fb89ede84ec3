"""`amalgam moe` on bad input: one `error:` line naming the problem, exit code 2, no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from zoo.conftest import zoo_tiny

from tests.helpers import run_cli

__all__ = ["zoo_tiny"]


def narrower_expert(zoo, folder: Path) -> Path:
    """The zoo's base with 100 MLP units instead of 160 (another shape, same tensor names)."""
    shutil.copytree(zoo.base, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for name in list(tensors):
        if "mlp.down_proj" in name:
            tensors[name] = tensors[name][:, :100].contiguous()
        elif ".mlp." in name:
            tensors[name] = tensors[name][:100].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    return folder


def run(zoo, tmp_path: Path, monkeypatch, capsys, body: dict) -> tuple[int, str]:
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(body))
    code, _, err = run_cli(
        ["moe", str(path), "--output", str(tmp_path / "out")], monkeypatch, capsys
    )
    assert not (tmp_path / "out").exists()
    return code, err


def expert(uri: str, prompt: str | None = "\u4f50") -> dict:
    return {"source_model": uri, **({"positive_prompts": [prompt]} if prompt else {})}


@pytest.mark.parametrize("case", ["shape", "missing", "per_token", "no_prompts"])
def test_bad_input_is_one_error_line(zoo_tiny, tmp_path: Path, monkeypatch, capsys, case: str):
    good = [
        expert(str(zoo_tiny.experts["zoo_sort"]), "\u4f41"),
        expert(str(zoo_tiny.experts["zoo_count"]), "\u4f42"),
    ]
    body = {"base_model": str(zoo_tiny.base), "experts": good}
    if case == "shape":
        body["experts"] = [good[0], expert(str(narrower_expert(zoo_tiny, tmp_path / "narrow")))]
        named = "intermediate_size 100, base has 160"
    elif case == "missing":
        body["experts"] = [good[0], expert(str(tmp_path / "nowhere"))]
        named = f"experts.1.source_model: {tmp_path / 'nowhere'}"
    elif case == "per_token":
        body["experts_per_token"] = 3
        named = "experts_per_token: 3 is more than the 2 experts"
    else:
        body["experts"] = [good[0], expert(str(zoo_tiny.experts["zoo_count"]), None)]
        named = "experts.1.positive_prompts: gate_mode hidden needs positive prompts"
    code, err = run(zoo_tiny, tmp_path, monkeypatch, capsys, body)
    assert code == 2 and err.startswith("error:") and named in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_expert_of_another_architecture(zoo_tiny, tmp_path: Path, monkeypatch, capsys):
    """An expert whose config says MoE (the zoo's Mixtral) is refused by its model_type."""
    body = {
        "base_model": str(zoo_tiny.base),
        "experts": [expert(str(zoo_tiny.experts["zoo_sort"]), "a"), expert(str(zoo_tiny.moe), "b")],
    }
    code, err = run(zoo_tiny, tmp_path, monkeypatch, capsys, body)
    assert (
        code == 2 and err.startswith("error:") and "model_type 'mixtral', base has 'llama'" in err
    )
