"""Activation matching: both models run on the same data (the recipe's
``align.permutation.data``), and each group is permuted to maximise the correlation of the
reference's and the model's unit activations (Git Re-Basin's activation matching).

Which activations: for every linear layer whose input columns a group permutes (MLP
``down_proj``: act(gate) * up; attention ``o_proj``: the heads' outputs), the layer's input;
for groups only a layer's output shows (BERT query/key head dims), the layer's output; with
``residual: true`` every hidden state too. Each is standardised per unit over the data's
tokens (padding dropped): inner products are correlations, solved
by the same coordinate descent as weight matching.

API (stable): ``read_texts(data, samples)``, ``feature_axes(spec)``,
``capture(folder, spec, texts, max_length, tokenizer_folder) -> {feature: (tokens, units)}``,
``match_activations(spec, ref_folder, model_folder, permutation) -> (perms, passes)``."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from amalgam.align.permutation.apply import Perms
from amalgam.align.permutation.matching import coordinate_descent
from amalgam.align.permutation.spec import RESIDUAL, AxisMap, Level, PermSpec
from amalgam.device import compute_threads, pick_device
from amalgam.errors import PlanError

if TYPE_CHECKING:
    from amalgam.recipe import PermutationSpec

BATCH = 32  # examples per forward pass
HIDDEN = "hidden_states"  # feature name prefix of the residual stream's states
IN, OUT = ":input", ":output"


def read_texts(data: str | None, samples: int) -> list[str]:
    """The first ``samples`` texts of ``data``: a task folder (``*.jsonl`` records: prompt +
    correct choice, or ``text``; taken from its files in turn), or a text file (one example
    per non-empty line)."""
    if not data:
        raise PlanError(
            "align.permutation.data: activation matching needs data (a task folder or a text "
            "file of lines)"
        )
    path = Path(data)
    if not path.exists():
        raise PlanError(f"align.permutation.data: {data} does not exist")
    if path.is_dir():  # round robin over the files, so every task is seen
        per_file = [
            [
                _record_text(json.loads(line), file)
                for line in file.read_text().splitlines()
                if line.strip()
            ]
            for file in sorted(path.rglob("*.jsonl"))
        ]
        texts = [t for group in itertools.zip_longest(*per_file) for t in group if t is not None]
    else:
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise PlanError(f"align.permutation.data: {data} holds no examples")
    return texts[:samples]


def _record_text(record: dict, file: Path) -> str:
    if "prompt" in record and "choices" in record and "label" in record:
        return record["prompt"] + record["choices"][record["label"]]
    if isinstance(record.get("text"), str):
        return record["text"]
    raise PlanError(f"align.permutation.data: {file}: a record without prompt/choices or text")


def feature_axes(spec: PermSpec) -> dict[str, list[AxisMap]]:
    """feature name (``<module>:input`` / ``<module>:output`` / ``hidden_states``) -> the
    permuted axis (1: units) of its (tokens, units) matrix."""
    features: dict[str, list[AxisMap]] = {}
    covered: set[str] = set()
    weights = [(n.removesuffix(".weight"), maps) for n, maps in spec.axes.items()]
    for module, maps in weights:
        for axis_map in maps:
            groups = {lv.group for lv in axis_map.levels} - {None, RESIDUAL}
            if axis_map.axis == 1 and groups and len(spec.shapes.get(module + ".weight", ())) == 2:
                features[module + IN] = [AxisMap(1, axis_map.levels)]
                covered |= groups
    for module, maps in weights:
        for axis_map in maps:
            groups = {lv.group for lv in axis_map.levels} - {None, RESIDUAL}
            if axis_map.axis == 0 and groups - covered:
                features[module + OUT] = [AxisMap(1, axis_map.levels)]
    if RESIDUAL in spec.groups:
        features[HIDDEN] = [AxisMap(1, (Level(spec.groups[RESIDUAL].size, RESIDUAL),))]
    return features


def _load(folder: str, architecture: str, tensor_names: list[str]) -> torch.nn.Module:
    # lazy: transformers takes seconds to import; only activation matching runs models
    import transformers

    if architecture == "bert":
        masked = any(n.startswith("cls.") for n in tensor_names)
        cls = transformers.AutoModelForMaskedLM if masked else transformers.AutoModel
    else:
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def capture(
    folder: str, spec: PermSpec, texts: list[str], max_length: int, tokenizer_folder: str
) -> dict[str, torch.Tensor]:
    """feature -> (tokens, units) activations of the model at ``folder`` on ``texts`` (in
    batches of ``BATCH``, padding dropped), standardised per unit (float64, on the CPU)."""
    # lazy: as in _load
    from transformers import AutoTokenizer

    features = feature_axes(spec)
    device = pick_device("auto")
    model = _load(folder, spec.architecture, list(spec.shapes)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch: dict[str, list[torch.Tensor]] = {name: [] for name in features}
    grabbed: dict[str, list[torch.Tensor]] = {name: [] for name in features}

    def hook(name: str, output: bool) -> Callable[..., None]:
        def grab(_module: torch.nn.Module, args: tuple, result: object = None) -> None:
            batch[name].append((result if output else args[0]).detach())

        return grab

    handles = [
        module.register_forward_hook(hook(name, True))
        if name.endswith(OUT)
        else module.register_forward_pre_hook(hook(name, False))
        for name in features
        if name != HIDDEN
        for module in [model.get_submodule(name.rsplit(":", 1)[0])]
    ]
    try:
        with torch.inference_mode(), compute_threads(None):
            for first in range(0, len(texts), BATCH):
                ids = tokenizer(
                    texts[first : first + BATCH],
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                result = model(
                    input_ids=ids["input_ids"],
                    attention_mask=ids["attention_mask"],
                    output_hidden_states=HIDDEN in features,
                )
                if HIDDEN in features:
                    batch[HIDDEN].extend(result.hidden_states)
                real = ids["attention_mask"].reshape(-1).bool()
                for name, chunks in batch.items():
                    grabbed[name] += [
                        c.reshape(-1, c.shape[-1])[real].double().cpu() for c in chunks
                    ]
                    chunks.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: _standardise(torch.cat(chunks)) for name, chunks in grabbed.items()}


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(0)
    return x / x.std(0).clamp_min(1e-8) / x.shape[0] ** 0.5


def match_activations(
    spec: PermSpec, ref_folder: str, model_folder: str, permutation: PermutationSpec
) -> tuple[Perms, int]:
    """(the permutations that bring the model's units onto the reference's by activation
    correlation on ``permutation.data``, coordinate-descent passes)."""
    texts = read_texts(permutation.data, permutation.samples)
    ref = capture(ref_folder, spec, texts, permutation.max_length, ref_folder)
    model = capture(model_folder, spec, texts, permutation.max_length, ref_folder)
    return coordinate_descent(
        spec.groups,
        feature_axes(spec),
        ref.__getitem__,
        model.__getitem__,
        seed=permutation.seed,
        max_iter=permutation.max_iter,
    )
