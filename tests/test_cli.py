"""The CLI: inspect and merge work; every bad input is one 'error:' line, exit 2, no output left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import family, llama_tensors, recipe_dict, run_cli, write_model


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, list[Path]]:
    return family(tmp_path / "in")


def test_inspect_json(models, monkeypatch, capsys) -> None:
    base, _ = models
    code, out, _ = run_cli(["inspect", str(base), "--json"], monkeypatch, capsys)
    assert code == 0
    report = json.loads(out)
    saved = load_file(str(base / "model.safetensors"))
    assert report["parameters"] == sum(t.numel() for t in saved.values())
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["files"] == ["model.safetensors"]
    assert report["content_hash"].startswith("sha256:")
    shapes = {t["name"]: t["shape"] for t in report["tensors"]}
    assert shapes == {k: list(v.shape) for k, v in saved.items()}


def test_merge_writes_model_and_summary(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    out = tmp_path / "out"
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "task_arithmetic", out))
    code, stdout, _ = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    assert code == 0, stdout
    assert "GB/s" in stdout and "peak RSS" in stdout
    merged = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    expected = b[name].float() + sum(
        load_file(str(e / "model.safetensors"))[name].float() - b[name].float() for e in experts
    )
    assert torch.equal(merged[name], expected.to(torch.bfloat16))
    assert (out / "config.json").exists()


def assert_one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def _mutate(expert: Path, fn) -> None:
    tensors = load_file(str(expert / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(expert / "model.safetensors"))


CASES = {
    "missing tensor": (
        lambda e: _mutate(e, lambda t: t.pop("model.norm.weight")),
        {},
        ["missing tensor 'model.norm.weight'", "expert0"],
    ),
    "shape mismatch": (
        lambda e: _mutate(e, lambda t: t.update({"model.norm.weight": torch.ones(9)})),
        {},
        ["model.norm.weight", "[9]", "[8]"],
    ),
    "nan input": (
        lambda e: _mutate(
            e,
            lambda t: t["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(3, float("nan")),
        ),
        {},
        ["model.layers.1.mlp.up_proj.weight", "expert0", "NaN"],
    ),
    "truncated file": (
        lambda e: (e / "model.safetensors").write_bytes(
            (e / "model.safetensors").read_bytes()[:-10]
        ),
        {},
        ["expert0/model.safetensors", "truncated or corrupt"],
    ),
    "corrupt header": (
        lambda e: (e / "model.safetensors").write_bytes(
            (1 << 40).to_bytes(8, "little") + b"{}" * 10
        ),
        {},
        ["expert0/model.safetensors", "corrupt safetensors header"],
    ),
    "pickle input": (
        lambda e: (
            (e / "model.safetensors").unlink(),
            torch.save(llama_tensors(0), e / "pytorch_model.bin"),
        ),
        {},
        ["pytorch_model.bin", "--allow-pickle"],
    ),
    "unknown method": (lambda e: None, {"method": "frankenmerge"}, ["frankenmerge", "method"]),
    "density out of range": (
        lambda e: None,
        {"method": "ties", "params": {"density": 1.5}},
        ["params.density", "(0.0, 1.0]"],
    ),
    "density zero per model": (
        lambda e: None,
        {"method": "dare_ties", "models": "first-density-0"},
        ["models[0].params.density"],
    ),
    "negative weight for linear": (
        lambda e: None,
        {"method": "linear", "params": {"weight": -1.0}},
        ["params.weight", "-1.0"],
    ),
    "unknown field": (lambda e: None, {"methd": "ties"}, ["methd"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case, models, tmp_path, monkeypatch, capsys):
    base, experts = models
    damage, changes, needles = CASES[case]
    damage(experts[0])
    data = recipe_dict(base, experts, "ties", tmp_path / "out")
    if changes.get("models") == "first-density-0":
        data["models"][0]["params"] = {"density": 0.0}
        changes = {k: v for k, v in changes.items() if k != "models"}
    data.update(changes)
    cfg = write_recipe(tmp_path / "r.yaml", data)
    code, _, err = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    assert_one_error(code, err, *needles)
    assert_nothing_left(tmp_path / "out")


def test_existing_output_needs_overwrite(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    out = tmp_path / "out"
    first = write_recipe(tmp_path / "r1.yaml", recipe_dict(base, experts, "linear", out))
    assert run_cli(["merge", str(first)], monkeypatch, capsys)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", out))
    code, _, err = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    assert_one_error(code, err, "output exists", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    code, _, _ = run_cli(["merge", str(cfg), "--overwrite"], monkeypatch, capsys)
    assert code == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert set(load_file(str(out / "model.safetensors"))) == set(llama_tensors(0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["user-model", "user-folder", "file", "cwd"])
def test_overwrite_replaces_only_what_amalgam_wrote(
    models, tmp_path, monkeypatch, capsys, kind
) -> None:
    """A model amalgam did not write, a user's folder, a file or the working directory is
    never replaced: --overwrite is refused naming the path, and nothing is touched."""
    base, experts = models
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = {
        "user-model": lambda: write_model(tmp_path / "out", {"x": torch.zeros(1)}),
        "user-folder": lambda: _thesis(tmp_path / "out"),
        "file": lambda: _thesis(tmp_path) / "thesis.tex",
        "cwd": lambda: _thesis(work) and Path("."),
    }[kind]()
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", out))
    before = _snapshot(tmp_path)
    code, _, err = run_cli(["merge", str(cfg), "--overwrite"], monkeypatch, capsys)
    assert_one_error(code, err, "--overwrite replaces only")
    assert _snapshot(tmp_path) == before


def _thesis(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but amalgam's own caches (``.amalgam``)."""
    files = (p for p in sorted(root.rglob("*")) if ".amalgam" not in p.parts)
    return {str(p): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize(
    "spelling", ["{base}/./", "{base}//", "{parent}/../{parent_name}/base", "link"]
)
def test_output_spelled_as_an_input_is_refused(
    models, tmp_path, monkeypatch, capsys, spelling
) -> None:
    """However the output names an input (dots, double slashes, a symlink), --overwrite never
    replaces it."""
    base, experts = models
    if spelling == "link":
        out = tmp_path / "link"
        out.symlink_to(base)
    else:
        out = spelling.format(base=base, parent=base.parent, parent_name=base.parent.name)
    before = _snapshot(base)
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", out))
    code, _, err = run_cli(["merge", str(cfg), "--overwrite"], monkeypatch, capsys)
    assert_one_error(code, err, "overlaps input 'base'")
    assert _snapshot(base) == before


def test_output_inside_input_is_refused(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    out = base / "merged"
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", out))
    code, _, err = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    assert_one_error(code, err, "overlaps input 'base'")
    assert not out.exists()


def test_pickle_allowed_on_request(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    tensors = load_file(str(experts[0] / "model.safetensors"))
    (experts[0] / "model.safetensors").unlink()
    torch.save(tensors, experts[0] / "pytorch_model.bin")
    out = tmp_path / "out"
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "linear", out))
    code, _, err = run_cli(["merge", str(cfg), "--allow-pickle"], monkeypatch, capsys)
    assert code == 0, err
    assert (out / "model.safetensors").exists()


def test_plan_error_lists_every_problem(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    _mutate(experts[0], lambda t: t.pop("model.norm.weight"))
    _mutate(experts[2], lambda t: t.update({"model.embed_tokens.weight": torch.zeros(3, 8)}))
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", tmp_path / "out"))
    code, _, err = run_cli(["merge", str(cfg)], monkeypatch, capsys)
    assert_one_error(
        code,
        err,
        "model 'expert0'",
        "missing tensor 'model.norm.weight'",
        "model.embed_tokens.weight",
        "'expert2'",
    )
    assert_nothing_left(tmp_path / "out")


def test_plan_only_writes_nothing(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    out = tmp_path / "out"
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", out))
    code, stdout, _ = run_cli(["merge", str(cfg), "--plan"], monkeypatch, capsys)
    assert code == 0
    assert "model.safetensors: 9 tensors" in stdout
    assert not out.exists()


def test_bad_option_is_one_line(models, tmp_path, monkeypatch, capsys) -> None:
    base, experts = models
    cfg = write_recipe(tmp_path / "r.yaml", recipe_dict(base, experts, "ties", tmp_path / "out"))
    code, _, err = run_cli(["merge", str(cfg), "--executor", "spark"], monkeypatch, capsys)
    assert_one_error(code, err, "--executor", "'local' or 'ray'")
    code, _, err = run_cli(["merge", str(cfg), "--threads", "0"], monkeypatch, capsys)
    assert_one_error(code, err, "--threads")
    assert_nothing_left(tmp_path / "out")


@pytest.mark.slow
def test_merge_runs_on_the_recipes_executor(models, tmp_path, monkeypatch, capsys) -> None:
    import ray

    base, experts = models
    outputs = {}
    ray.shutdown()  # so that the check below sees the Ray this merge started
    for executor in ("local", "ray"):
        out = tmp_path / executor
        data = recipe_dict(base, experts, "task_arithmetic", out)
        if executor == "ray":
            data["executor"] = "ray"
        cfg = write_recipe(tmp_path / f"{executor}.yaml", data)
        code, stdout, _ = run_cli(["merge", str(cfg)], monkeypatch, capsys)
        assert code == 0, stdout
        outputs[executor] = (out / "model.safetensors").read_bytes()
        assert ray.is_initialized() == (executor == "ray")
    assert outputs["local"] == outputs["ray"]
