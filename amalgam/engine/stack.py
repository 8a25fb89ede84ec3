"""Stacked inputs for a recipe's ``slices`` or ``layer_swap``: each merge input read as a model
whose layers are layer ranges of other models, renumbered in order (mergekit's ``slices``).

A stacked input is a lazy view: it reads each tensor from the model and layer it stands for,
so the engine plans, streams and writes it like any input. Its config is its first part's,
with the layer count (``num_hidden_layers``; GPT-2's ``n_layer``) set to the stacked count and
every per-layer list (a config list as long as the model has layers, such as ``layer_types``)
rebuilt from the parts. Tensors outside the layers follow mergekit: embeddings (names with
``embed``, ``wte`` or ``wpe``) come from the first slice's model, every other one (final norm,
LM head) from the last slice's.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import replace
from typing import Any

import torch

from amalgam.adapters import open_input
from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError
from amalgam.methods.params import LAYER_RE, layer_index
from amalgam.recipe import Recipe

STACK_PREFIX = "stack:"
PRE_LAYER = re.compile(r"embed|wte|wpe")
# (input label, start, end): one slice source
Source = tuple[str, int, int]


# a config's layer-count key, by architecture family (Llama and most: the first; GPT-2: n_layer)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def count_key(config: dict) -> str:
    """The key holding the layer count in ``config`` (``num_hidden_layers`` if none does)."""
    return next((k for k in LAYER_KEYS if isinstance(config.get(k), int)), LAYER_KEYS[0])


def layer_count(ckpt: Checkpoint) -> int:
    """The model's layers: the count in its config, else from its tensor names."""
    configured = (ckpt.config or {}).get(count_key(ckpt.config or {}))
    if configured:
        return int(configured)
    found = [k for k in map(layer_index, ckpt.tensors) if k is not None]
    return max(found) + 1 if found else 0


def renumber(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer`` (a name without one: unchanged)."""
    m = LAYER_RE.search(name)
    return name if m is None else f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


class StackedCheckpoint(Checkpoint):
    """Layer ranges of opened checkpoints, stacked in order: ``parts`` is (checkpoint, start,
    end). Side files are the first part's; ``uri`` reopens it (:func:`open_any`)."""

    config_edited = True

    def __init__(self, uri: str, parts: list[tuple[Checkpoint, int, int]]):
        first, last = parts[0][0], parts[-1][0]
        self.uri, self.parts = uri, parts
        self.storage_options, self.fs, self.path = first.storage_options, first.fs, first.path
        self.root, self.files, self.kind = first.root, first.files, first.kind
        self.metadata = first.metadata
        self._lock, self._fds, self._pickled = threading.Lock(), {}, None
        self._reads: dict[str, tuple[Checkpoint, str]] = {}
        out = 0
        for ckpt, start, end in parts:
            for name in ckpt.tensors:
                k = layer_index(name)
                if k is not None and start <= k < end:
                    self._reads[renumber(name, out + k - start)] = (ckpt, name)
            out += end - start
        for ckpt, pre in ((first, True), (last, False)):
            for name in ckpt.tensors:
                if layer_index(name) is None and bool(PRE_LAYER.search(name)) == pre:
                    self._reads[name] = (ckpt, name)
        self.tensors = {
            name: replace(ckpt.info(src), name=name) for name, (ckpt, src) in self._reads.items()
        }
        self.config = _stacked_config(parts, out)

    def tensor(self, name: str) -> torch.Tensor:
        self.info(name)  # an unknown name: the usual CheckpointError
        ckpt, src = self._reads[name]
        return ckpt.tensor(src)

    def view(self, name: str) -> torch.Tensor:
        self.info(name)
        ckpt, src = self._reads[name]
        return ckpt.view(src)

    def stored_parts(self) -> list[Checkpoint]:
        return [leaf for c, _, _ in self.parts for leaf in c.stored_parts()]

    def content_hash(self) -> str:
        layout = [(c.content_hash(), start, end) for c, start, end in self.parts]
        return "sha256:" + hashlib.sha256(json.dumps(layout).encode()).hexdigest()

    def close(self) -> None:
        for ckpt in {id(c): c for c, _, _ in self.parts}.values():
            ckpt.close()

    def __repr__(self) -> str:
        ranges = ", ".join(f"{c.uri}[{a}:{b}]" for c, a, b in self.parts)
        return f"StackedCheckpoint({ranges})"


def _stacked_config(parts: list[tuple[Checkpoint, int, int]], count: int) -> dict | None:
    first = parts[0][0]
    if first.config is None:
        return None
    config = dict(first.config)
    n = layer_count(first)
    for key, value in first.config.items():
        if key != "architectures" and isinstance(value, list) and n > 1 and len(value) == n:
            config[key] = [v for c, a, b in parts for v in (c.config or {}).get(key, value)[a:b]]
    config[count_key(config)] = count
    return config


def recipe_slices(recipe: Recipe, inputs: dict[str, Checkpoint]) -> list[list[Source]]:
    """The recipe's slices (``layer_swap`` written out as slices), each range checked against
    its model's layer count."""
    swap = recipe.layer_swap
    if swap is not None:
        other = next(label for label in inputs if label != swap.model)
        n = layer_count(inputs[swap.model])
        if layer_count(inputs[other]) != n or swap.bottom + swap.top > n:
            raise PlanError(
                f"layer_swap: '{swap.model}' has {n} layers and '{other}' "
                f"{layer_count(inputs[other])}: the two must have as many, and bottom + top "
                f"({swap.bottom} + {swap.top}) at most that"
            )
        cuts = [(swap.model, 0, swap.bottom), (other, swap.bottom, n - swap.top)]
        cuts.append((swap.model, n - swap.top, n))
        return [[c] for c in cuts if c[2] > c[1]]
    slices = [[(s.model, *s.layers) for s in piece.sources] for piece in recipe.slices or []]
    for i, piece in enumerate(slices):
        for j, (label, start, end) in enumerate(piece):
            n = layer_count(inputs[label])
            if end > n:
                raise PlanError(
                    f"slices[{i}].sources[{j}]: layers [{start}, {end}) are outside model "
                    f"'{label}' ({inputs[label].uri}), which has {n} layers"
                )
    return slices


def stack_inputs(recipe: Recipe, inputs: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    """The merge's inputs as stacked checkpoints: one per input (each slice names every input
    once), or, for a method of one input (passthrough), one under the first slice's label.
    Inputs no slice reads are closed."""
    slices = recipe_slices(recipe, inputs)
    if recipe.method_spec.single_input:
        groups = {slices[0][0][0]: [piece[0] for piece in slices]}
    else:
        groups = {
            label: [next(s for s in piece if s[0] == label) for piece in slices] for label in inputs
        }
    used = {label for sources in groups.values() for label, _, _ in sources}
    for label in set(inputs) - used:
        inputs[label].close()
    return {
        key: stacked([(inputs[label], a, b) for label, a, b in sources], recipe.base)
        for key, sources in groups.items()
    }


def stacked(parts: list[tuple[Checkpoint, int, int]], base: str | None) -> StackedCheckpoint:
    """A stacked checkpoint over opened ``parts``, with a URI that :func:`open_any` reopens
    (``base``: the recipe's base, over which an adapter part opens)."""
    layout = {"base": base, "parts": [[c.uri, a, b] for c, a, b in parts]}
    return StackedCheckpoint(STACK_PREFIX + json.dumps(layout), parts)


def describe_stack(uri: str) -> str | None:
    """The layer ranges a stacked input's URI reads (``models/a[0:24], models/b[20:40]``);
    None for any other URI."""
    if not uri.startswith(STACK_PREFIX):
        return None
    parts = json.loads(uri[len(STACK_PREFIX) :])["parts"]
    return ", ".join(f"{u}[{a}:{b}]" for u, a, b in parts)


def open_any(uri: str, *, allow_pickle: bool = False, **storage_options: Any) -> Checkpoint:
    """Open a merge input by the URI a plan holds: a stacked input (``stack:``) or any other
    (:func:`amalgam.adapters.open_input`)."""
    if not uri.startswith(STACK_PREFIX):
        return open_input(uri, allow_pickle=allow_pickle, **storage_options)
    layout = json.loads(uri[len(STACK_PREFIX) :])
    opened: dict[str, Checkpoint] = {}
    try:
        for part, _, _ in layout["parts"]:
            if part not in opened:
                opened[part] = open_input(
                    part, base=layout["base"], allow_pickle=allow_pickle, **storage_options
                )
    except BaseException:
        for c in opened.values():
            c.close()
        raise
    return StackedCheckpoint(uri, [(opened[u], a, b) for u, a, b in layout["parts"]])
