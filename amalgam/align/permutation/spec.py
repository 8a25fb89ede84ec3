"""Which hidden units of a checkpoint can be permuted without changing its function, derived
from its architecture (``config.json`` ``model_type`` plus tensor names and shapes).

API used by the other permutation aligners (stable):

- ``derive_spec(ckpt, residual=False) -> PermSpec``: the spec of a checkpoint; raises
  ``PlanError`` naming the tensor when the checkpoint does not fit its architecture.
- ``check_same_architecture(spec_a, spec_b, label_a, label_b)``: refuse models that differ.
- ``PermSpec.groups``: name -> ``Group(size, count)``; a permutation of a group is an int64
  tensor of shape ``(count, size)`` ("gather" convention: new unit ``i`` is old unit
  ``perm[b, i]``).
- ``PermSpec.axes``: tensor name -> its permuted axes, each an ``AxisMap`` whose ``levels``
  split the axis (outermost first) into sub-indices, each permuted by a group or left as is.

A group with ``count > 1`` holds one permutation per slot of its axis's first level: the
query heads of each KV group, the head dims of each head. The sub-permutations are indexed by
the *new* slot, so they follow the outer permutation.

Decoders (``llama``, ``mistral``, ``qwen2``): per layer the MLP intermediate units
(``<layer>.mlp``), the KV groups (``<layer>.self_attn.kv``, each KV head moving with its query
heads), the query heads inside each KV group (``.heads``) and the value/output dims of each KV
head (``.vo``). Query/key head dims stay in place: RoPE rotates dim ``i`` with dim ``i + d/2`` at
a frequency that depends on ``i``, so no permutation of them other than the identity keeps
the attention scores (docs/align-permutation.md). Encoders (``bert``): the MLP units, the
heads, and per head the query/key dims (``.qk``) and value/output dims (``.vo``), which
absolute position embeddings leave free. ``residual=True`` adds one permutation of the hidden
size (``residual``) across embeddings, every projection's input or output, norms and heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError

DECODERS = ("llama", "mistral", "qwen2")
ENCODERS = ("bert",)
RESIDUAL = "residual"
#: tensors that hold no hidden units (buffers some exporters save).
IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")


@dataclass(frozen=True)
class Group:
    """One permutation variable: ``count`` independent permutations of ``size`` units."""

    size: int
    count: int = 1


@dataclass(frozen=True)
class Level:
    """A sub-index of an axis: ``size`` positions permuted by ``group`` (None: in place)."""

    size: int
    group: str | None = None


@dataclass(frozen=True)
class AxisMap:
    """Axis ``axis`` of a tensor, split into ``levels`` (outermost first)."""

    axis: int
    levels: tuple[Level, ...]


@dataclass
class PermSpec:
    """The permutation symmetry of one architecture instance (see the module docstring)."""

    architecture: str
    groups: dict[str, Group] = field(default_factory=dict)
    axes: dict[str, list[AxisMap]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor it covers

    def tensor(
        self, name: str, shape: tuple[int, ...], *axes: tuple[int, tuple[Level, ...]]
    ) -> None:
        """Record tensor ``name`` of ``shape`` and how each of its ``axes`` is split."""
        self.shapes[name] = shape
        for axis, levels in axes:
            self.add(name, axis, *levels)

    def add(self, tensor: str, axis: int, *levels: Level) -> None:
        """Record that ``axis`` of ``tensor`` is split into ``levels``."""
        kept = tuple(lv if lv.group in self.groups else Level(lv.size) for lv in levels)
        if any(lv.group for lv in kept):
            self.axes.setdefault(tensor, []).append(AxisMap(axis, kept))

    def group(self, name: str, size: int, count: int = 1) -> str:
        """Declare a group (a group of one unit is no symmetry and is left out)."""
        if size > 1:
            self.groups[name] = Group(size, count)
        return name

    def to_json(self) -> dict:
        """A JSON description (saved next to the permutations)."""
        return {
            "architecture": self.architecture,
            "groups": {n: [g.count, g.size] for n, g in self.groups.items()},
            "axes": {
                t: [[m.axis, [[lv.size, lv.group] for lv in m.levels]] for m in maps]
                for t, maps in self.axes.items()
            },
        }


def _config_int(config: dict, key: str, uri: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or value <= 0:
        raise PlanError(f"{uri}/config.json: field {key} missing or not a positive integer")
    return value


def derive_spec(ckpt: Checkpoint, *, residual: bool = False) -> PermSpec:
    """The permutation spec of ``ckpt``, checked against its tensor names and shapes."""
    config = ckpt.config or {}
    model_type = config.get("model_type")
    if model_type in DECODERS:
        spec = _decoder(ckpt, config, residual)
    elif model_type in ENCODERS:
        spec = _encoder(ckpt, config, residual)
    else:
        raise PlanError(
            f"{ckpt.uri}/config.json: model_type {model_type!r} has no permutation spec "
            f"(supported: {', '.join(DECODERS + ENCODERS)})"
        )
    names = set(ckpt.names())
    for name, shape in spec.shapes.items():
        if name not in names:
            raise PlanError(f"{ckpt.uri}: tensor {name} missing (the {model_type} spec needs it)")
        if ckpt.shape(name) != shape:
            raise PlanError(
                f"{ckpt.uri}: tensor {name} has shape {list(ckpt.shape(name))}, the "
                f"{model_type} spec expects {list(shape)}"
            )
    for name in sorted(names - set(spec.shapes)):
        if not IGNORED.search(name):
            raise PlanError(
                f"{ckpt.uri}: tensor {name} is not part of the {model_type} permutation spec"
            )
    return spec


def _prefix(ckpt: Checkpoint, candidates: tuple[str, ...], anchor: str) -> str:
    names = set(ckpt.names())
    for prefix in candidates:
        if prefix + anchor in names:
            return prefix
    raise PlanError(f"{ckpt.uri}: tensor {candidates[0]}{anchor} missing (no embedding table)")


def _decoder(ckpt: Checkpoint, config: dict, residual: bool) -> PermSpec:
    uri = ckpt.uri
    hidden = _config_int(config, "hidden_size", uri)
    heads = _config_int(config, "num_attention_heads", uri)
    kv = _config_int(config, "num_key_value_heads", uri, heads)
    dim = _config_int(config, "head_dim", uri, None) if config.get("head_dim") else hidden // heads
    inter = _config_int(config, "intermediate_size", uri)
    layers = _config_int(config, "num_hidden_layers", uri)
    vocab = _config_int(config, "vocab_size", uri)
    if heads % kv:
        raise PlanError(f"{uri}/config.json: num_attention_heads {heads} not a multiple of {kv}")
    root = _prefix(ckpt, ("model.", ""), "embed_tokens.weight")
    names = set(ckpt.names())
    spec = PermSpec(str(config["model_type"]))
    res = Level(hidden, spec.group(RESIDUAL, hidden) if residual else None)

    def optional_bias(weight: str, size: int, levels: tuple[Level, ...]) -> None:
        bias = weight.removesuffix("weight") + "bias"
        if bias in names:
            spec.tensor(bias, (size,), (0, levels))

    spec.tensor(f"{root}embed_tokens.weight", (vocab, hidden), (1, (res,)))
    spec.tensor(f"{root}norm.weight", (hidden,), (0, (res,)))
    if "lm_head.weight" in names or not config.get("tie_word_embeddings", False):
        spec.tensor("lm_head.weight", (vocab, hidden), (1, (res,)))
    for n in range(layers):
        p = f"{root}layers.{n}."
        mlp = Level(inter, spec.group(f"{p}mlp", inter))
        for proj in ("gate_proj", "up_proj"):
            spec.tensor(f"{p}mlp.{proj}.weight", (inter, hidden), (0, (mlp,)), (1, (res,)))
            optional_bias(f"{p}mlp.{proj}.weight", inter, (mlp,))
        spec.tensor(f"{p}mlp.down_proj.weight", (hidden, inter), (0, (res,)), (1, (mlp,)))
        optional_bias(f"{p}mlp.down_proj.weight", hidden, (res,))
        a = f"{p}self_attn"
        kvl = Level(kv, spec.group(f"{a}.kv", kv))
        headl = Level(heads // kv, spec.group(f"{a}.heads", heads // kv, kv))
        vo = Level(dim, spec.group(f"{a}.vo", dim, kv))
        q_rows = (kvl, headl, Level(dim))
        for proj, rows in (
            ("q_proj", q_rows),
            ("k_proj", (kvl, Level(dim))),
            ("v_proj", (kvl, vo)),
        ):
            size = rows_size(rows)
            spec.tensor(f"{a}.{proj}.weight", (size, hidden), (0, rows), (1, (res,)))
            optional_bias(f"{a}.{proj}.weight", size, rows)
        spec.tensor(f"{a}.o_proj.weight", (hidden, heads * dim), (0, (res,)), (1, (kvl, headl, vo)))
        optional_bias(f"{a}.o_proj.weight", hidden, (res,))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            spec.tensor(f"{p}{norm}.weight", (hidden,), (0, (res,)))
    return spec


def _encoder(ckpt: Checkpoint, config: dict, residual: bool) -> PermSpec:
    uri = ckpt.uri
    hidden = _config_int(config, "hidden_size", uri)
    heads = _config_int(config, "num_attention_heads", uri)
    inter = _config_int(config, "intermediate_size", uri)
    layers = _config_int(config, "num_hidden_layers", uri)
    vocab = _config_int(config, "vocab_size", uri)
    positions = _config_int(config, "max_position_embeddings", uri)
    types = _config_int(config, "type_vocab_size", uri, 2)
    dim = hidden // heads
    root = _prefix(ckpt, ("bert.", ""), "embeddings.word_embeddings.weight")
    names = set(ckpt.names())
    spec = PermSpec(str(config["model_type"]))
    res = Level(hidden, spec.group(RESIDUAL, hidden) if residual else None)

    def dense(name: str, rows: tuple[Level, ...], cols: tuple[Level, ...]) -> None:
        spec.tensor(f"{name}.weight", (rows_size(rows), rows_size(cols)), (0, rows), (1, cols))
        spec.tensor(f"{name}.bias", (rows_size(rows),), (0, rows))

    def layer_norm(name: str) -> None:
        for part in ("weight", "bias"):
            spec.tensor(f"{name}.{part}", (hidden,), (0, (res,)))

    e = f"{root}embeddings"
    for table, count in (("word", vocab), ("position", positions), ("token_type", types)):
        spec.tensor(f"{e}.{table}_embeddings.weight", (count, hidden), (1, (res,)))
    layer_norm(f"{e}.LayerNorm")
    for n in range(layers):
        p = f"{root}encoder.layer.{n}."
        headl = Level(heads, spec.group(f"{p}attention.heads", heads))
        qk = Level(dim, spec.group(f"{p}attention.qk", dim, heads))
        vo = Level(dim, spec.group(f"{p}attention.vo", dim, heads))
        for proj, rows in (("query", (headl, qk)), ("key", (headl, qk)), ("value", (headl, vo))):
            dense(f"{p}attention.self.{proj}", rows, (res,))
        dense(f"{p}attention.output.dense", (res,), (headl, vo))
        layer_norm(f"{p}attention.output.LayerNorm")
        mlp = Level(inter, spec.group(f"{p}intermediate", inter))
        dense(f"{p}intermediate.dense", (mlp,), (res,))
        dense(f"{p}output.dense", (res,), (mlp,))
        layer_norm(f"{p}output.LayerNorm")
    if f"{root}pooler.dense.weight" in names:
        dense(f"{root}pooler.dense", (Level(hidden),), (res,))
    if "cls.predictions.transform.dense.weight" in names:
        # the MLM head's transform output feeds the decoder tied to the word embeddings, so it
        # lives in the residual basis too
        dense("cls.predictions.transform.dense", (res,), (res,))
        layer_norm("cls.predictions.transform.LayerNorm")
        spec.tensor("cls.predictions.bias", (vocab,))
        if "cls.predictions.decoder.weight" in names:
            spec.tensor("cls.predictions.decoder.weight", (vocab, hidden), (1, (res,)))
            if "cls.predictions.decoder.bias" in names:
                spec.tensor("cls.predictions.decoder.bias", (vocab,))
    return spec


def rows_size(levels: tuple[Level, ...]) -> int:
    """The length of an axis split into ``levels``."""
    size = 1
    for level in levels:
        size *= level.size
    return size


def check_same_architecture(a: PermSpec, b: PermSpec, label_a: str, label_b: str) -> None:
    """Refuse two models whose permutation specs differ (architecture, sizes, tensors)."""
    if a.architecture != b.architecture:
        raise PlanError(
            f"architectures differ: {label_a} is {a.architecture}, {label_b} is {b.architecture}"
        )
    for name in sorted(set(a.shapes) | set(b.shapes)):
        if a.shapes.get(name) != b.shapes.get(name):
            raise PlanError(
                f"architectures differ: tensor {name} is {_shape(a, name)} in {label_a}, "
                f"{_shape(b, name)} in {label_b}"
            )


def _shape(spec: PermSpec, name: str) -> str:
    return str(list(spec.shapes[name])) if name in spec.shapes else "missing"
