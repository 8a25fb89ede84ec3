"""Small real checkpoints for tests: a Llama-named base and fine-tune-like experts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 8,
    "dtype": "bfloat16",
}


def llama_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        out[p + "mlp.up_proj.weight"] = torch.randn(12, 8, generator=g)
        out[p + "input_layernorm.weight"] = torch.ones(8) + 0.1 * torch.randn(8, generator=g)
    out["model.norm.weight"] = torch.ones(8)
    out = {k: v.to(dtype) for k, v in out.items()}
    out["model.rotary.inv_freq_ids"] = torch.arange(4)
    return out


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    return folder


def family(root: Path, n: int = 3, scale: float = 0.05) -> tuple[Path, list[Path]]:
    """A base and ``n`` experts = base + small random deltas (float tensors only)."""
    base = llama_tensors(0)
    base_dir = write_model(root / "base", base)
    experts = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        t = {
            k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        experts.append(write_model(root / f"expert{i}", t))
    return base_dir, experts


def recipe_dict(base: Path | None, experts: list[Path], method: str, out: Path, **extra) -> dict:
    data = {
        "method": method,
        "models": [{"uri": str(e)} for e in experts],
        "output": str(out),
        **extra,
    }
    if base is not None:
        data["base"] = str(base)
    return data


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str, str]:
    """Run `amalgam ARGS` in process: (exit code, stdout, stderr)."""
    from amalgam_flows.cli import main

    monkeypatch.setattr(sys, "argv", ["amalgam", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (not a package) as module ``<name>_benchmark``."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def upload_family(s3: Any, root: Path, dest: str) -> None:
    """A :func:`family` (base and three experts) built under ``root`` and uploaded to ``dest``
    (``bucket/prefix``), one folder per model, straight to the store."""
    base, experts = family(root)
    fs = s3.filesystem()
    for folder in (base, *experts):
        fs.put(str(folder), f"{dest}/{folder.name}", recursive=True)
