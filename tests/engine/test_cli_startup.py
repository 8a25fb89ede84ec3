"""What `amalgam merge` pays besides the merge: the modules its start-up loads, the inputs'
hashing, and the console script's exit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from amalgam.engine import MergeOptions, open_recipe_inputs
from amalgam.engine.inputs import parent_hashes
from amalgam.recipe import Recipe
from amalgam.zoo import Zoo

HEAVY = {"torch", "numpy", "scipy", "prefect", "mlflow", "ray", "transformers", "lm_eval", "peft"}
REPO = Path(__file__).resolve().parents[2]


def loaded_after(statement: str) -> set[str]:
    """The top-level packages of HEAVY that ``statement`` loads in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return HEAVY & set(out.stdout.split())


def test_the_command_line_loads_no_heavy_library() -> None:
    assert loaded_after("import amalgam_flows.cli") == set()


def test_a_merge_loads_torch_but_no_scipy_nor_orchestration() -> None:
    # the merge command's own imports: the engine and the adapter-output dispatcher
    loaded = loaded_after("import amalgam.engine, amalgam.adapters.adapter_output")
    assert loaded == {"torch", "numpy"}


def test_inputs_hashed_side_by_side_match_a_plain_sha256(
    zoo_tiny: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))  # an empty hash cache
    experts = sorted(zoo_tiny.experts)[:3]
    recipe = Recipe(
        method="task_arithmetic",
        base=str(zoo_tiny.base),
        models=[{"uri": str(zoo_tiny.experts[e])} for e in experts],
    )
    inputs = open_recipe_inputs(recipe, MergeOptions(output=str(tmp_path / "out")))
    try:
        hashes = parent_hashes(inputs)
    finally:
        for c in inputs.values():
            c.close()
    assert list(hashes) == ["base", *(c for c in inputs if c != "base")]
    for label, folder in [
        ("base", zoo_tiny.base),
        *zip(list(inputs)[1:], [zoo_tiny.experts[e] for e in experts], strict=True),
    ]:
        files = sorted(p.name for p in Path(folder).glob("*.safetensors"))
        h = hashlib.sha256()
        for name in files:
            digest = hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
            h.update(f"{name}\0{digest}\n".encode())
        assert hashes[label] == "sha256:" + h.hexdigest(), label


def run_script(args: list[str], env: dict[str, str], marker: Path) -> subprocess.CompletedProcess:
    """``amalgam ARGS`` through the console script, with an exit handler that leaves ``marker``."""
    code = (
        "import atexit, pathlib, sys; "
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran'); "
        f"sys.argv = ['amalgam', *{args!r}]; "
        "from amalgam_flows.cli import entry; entry()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_the_console_script_merges_runs_exit_handlers_and_reports_errors(
    zoo_tiny: Zoo, tmp_path: Path
) -> None:
    env = {**os.environ, "AMALGAM_HOME": str(tmp_path / "home")}
    experts = sorted(zoo_tiny.experts)[:2]
    config = tmp_path / "linear.yaml"
    models = [zoo_tiny.base, *(zoo_tiny.experts[e] for e in experts)]
    config.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "models": [{"model": str(m), "parameters": {"weight": 1 / 3}} for m in models],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "out"
    done = run_script(["merge", str(config), "--output", str(out)], env, tmp_path / "ran")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ran").read_text() == "ran"
    assert "merged 3 inputs with linear" in done.stdout
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    name = "model.layers.0.mlp.up_proj.weight"
    parts = [load_file(next(Path(m).glob("*.safetensors")))[name] for m in models]
    expected = parts[0] / 3 + parts[1] / 3 + parts[2] / 3
    assert (merged[name] - expected).abs().max() < 1e-6

    again = run_script(["merge", str(config), "--output", str(out)], env, tmp_path / "ran2")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {out}: output exists (pass --overwrite to replace it)"
    ]
    assert (tmp_path / "ran2").read_text() == "ran"
