"""Run a Twin-Merging folder as the paper does: per input, the router's weights w(x) over
tasks, then the model ``theta* + sum_t w_t(x) * U_t S_t V_t^T`` (1-D tensors: ``+ w_t delta_t``)
scores that input. Inputs whose weights are equal share one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from amalgam.evaluate.quick import choice_correct
from amalgam.twin.errors import TwinError
from amalgam.twin.manifest import MANIFEST, ROUTER, read_twin_manifest
from amalgam.twin.router import Router, prompt_features
from amalgam.twin.svd import mix


def is_twin(folder: str | Path) -> bool:
    """``folder`` is a local Twin-Merging folder (it holds ``twin.json``)."""
    return (Path(folder) / MANIFEST).is_file()


class TwinModel:
    """The shared model (transformers) with each task's exclusive factors and the router."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from amalgam.device import load_causal_lm  # lazy: transformers

        folder = Path(folder)
        self.manifest = read_twin_manifest(str(folder))
        self.tasks: list[str] = list(self.manifest["tasks"])
        self.model, self.tokenizer = load_causal_lm(folder, device)
        self.router = Router.from_tensors(self.tasks, load_file(folder / ROUTER))
        stored: dict[str, torch.Tensor] = {}
        for file in self.manifest["factor_files"]:
            stored |= load_file(folder / file, device=str(self.model.device))
        params = dict(self.model.named_parameters())
        self.shared: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        for name, entry in self.manifest["tensors"].items():
            if name not in params:
                raise TwinError(f"{folder}: tensor '{name}' is not a parameter of the model")
            self.shared[name] = params[name].detach().clone()
            suffixes = (".us", ".v") if entry["stored"] == "svd" else (".delta",)
            self.parts[name] = [
                tuple(stored[f"{t}/{name}{s}"].float() for s in suffixes) for t in self.tasks
            ]
        self._params = params

    def route(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mixing weights over tasks for each prompt (n x tasks), from the shared model."""
        self.load_weights(None)
        return self.router.weights(prompt_features(self.model, self.tokenizer, prompts))

    def load_weights(self, weights: torch.Tensor | None) -> None:
        """Set the model to ``theta* + sum_t weights[t] * delta_hat_t`` (None: theta*)."""
        with torch.no_grad():
            for name, shared in self.shared.items():
                if weights is None:
                    value = shared
                elif len(self.parts[name][0]) == 2:
                    value = mix(shared, weights.to(shared.device), self.parts[name])
                else:
                    deltas = torch.stack([p[0] for p in self.parts[name]])
                    value = shared + torch.einsum("t,t...->...", weights.to(shared.device), deltas)
                self._params[name].copy_(value)

    def correct(self, records: Sequence[dict[str, Any]]) -> list[bool]:
        """Per record: is its label the most likely choice under its own mixed model?"""
        weights = self.route([r["prompt"] for r in records])
        groups: dict[bytes, list[int]] = {}
        for i, row in enumerate(weights):
            groups.setdefault(row.numpy().tobytes(), []).append(i)
        out: list[bool] = [False] * len(records)
        for rows in groups.values():
            self.load_weights(weights[rows[0]])
            for i, ok in zip(
                rows,
                choice_correct(self.model, self.tokenizer, [records[i] for i in rows]),
                strict=True,
            ):
                out[i] = ok
        self.load_weights(None)
        return out


def twin_correct(
    folder: str | Path,
    tasks_dir: str | Path,
    tasks: Sequence[str],
    *,
    split: str = "test",
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, list[bool]]:
    """Task -> per-record correctness of a Twin folder, each record scored by its own mix."""
    from amalgam.evaluate.taskdir import read_split  # lazy: keeps this module's imports few

    records = {t: read_split(Path(tasks_dir), t, split)[:limit] for t in tasks}  # checked first
    model = TwinModel(folder, device)
    return {t: model.correct(rs) for t, rs in records.items()}


def twin_scores(
    folder: str | Path,
    tasks_dir: str | Path,
    tasks: Sequence[str],
    *,
    split: str = "test",
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Task -> accuracy of a Twin folder (see :func:`twin_correct`)."""
    correct = twin_correct(folder, tasks_dir, tasks, split=split, limit=limit, device=device)
    return {t: sum(c) / len(c) if c else 0.0 for t, c in correct.items()}
