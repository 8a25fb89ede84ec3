"""Permuted copies keep the function: a random valid permutation of every group (and of the
residual stream) leaves the tiny zoo Llama's logits on zoo prompts and a BERT's hidden states
unchanged to float32 rounding; a spec that does not fit is refused, naming the tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from amalgam.align.permutation.apply import (
    axis_index,
    identity_perms,
    permute_tensor,
    permuted_copy,
    random_perms,
)
from amalgam.align.permutation.spec import check_same_architecture, derive_spec
from amalgam.checkpoint import Checkpoint
from amalgam.errors import PlanError
from tests.align.permutation_models import (
    bert_hidden,
    bert_model,
    logit_gap,
    tensors_equal,
    tiny_zoo,
    zoo_prompt_ids,
)
from tests.helpers import run_cli


@pytest.mark.parametrize("residual", [False, True])
def test_permuted_zoo_llama_keeps_its_logits(tmp_path: Path, residual: bool) -> None:
    out = tmp_path / "permuted"
    permuted_copy(str(tiny_zoo().base), str(out), seed=7, residual=residual)
    changed = tensors_equal(tiny_zoo().base, out)
    assert any(".mlp." in n for n in changed) and any("self_attn" in n for n in changed)
    assert ("model.embed_tokens.weight" in changed) == residual
    prompts = zoo_prompt_ids(tiny_zoo())
    assert logit_gap(tiny_zoo().base, out, prompts) < 1e-4


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("masked_lm", [False, True])
def test_permuted_bert_keeps_its_hidden_states(
    tmp_path: Path, residual: bool, masked_lm: bool
) -> None:
    src = bert_model(tmp_path / "bert", seed=1, masked_lm=masked_lm)
    out = tmp_path / "permuted"
    permuted_copy(str(src), str(out), seed=3, residual=residual)
    assert tensors_equal(src, out)
    want, got = bert_hidden(src), bert_hidden(out)
    if residual:  # the hidden states come out in the permuted basis
        spec = derive_spec(Checkpoint(str(src)), residual=True)
        perm = random_perms(spec, 3)["residual"][0]
        want = want[..., perm]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_head_dims_are_not_a_symmetry(tmp_path: Path) -> None:
    """Why the decoder spec leaves q/k head dims in place: permuting the first half of every
    q/k head and mirroring it onto the second half changes the logits under RoPE."""
    spec = derive_spec(Checkpoint(str(tiny_zoo().base)))
    assert not any(".qk" in g for g in spec.groups)
    tensors = load_file(tiny_zoo().base / "model.safetensors")
    half = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])
    dims = torch.cat([half, half + 8])
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = tensors[name].shape[0]
            index = (torch.arange(rows // 16)[:, None] * 16 + dims).reshape(-1)
            tensors[name] = tensors[name][index].contiguous()
    out = tmp_path / "mirrored"
    shutil.copytree(tiny_zoo().base, out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    assert logit_gap(tiny_zoo().base, out, zoo_prompt_ids(tiny_zoo(), limit=1)) > 1e-3


def test_every_axis_index_is_a_permutation(tmp_path: Path) -> None:
    ckpt = Checkpoint(str(bert_model(tmp_path / "bert", seed=2)))
    spec = derive_spec(ckpt, residual=True)
    layer = "bert.encoder.layer.0."
    assert spec.groups[f"{layer}attention.qk"].count == 4
    assert {f"{layer}intermediate", f"{layer}attention.heads", "residual"} <= set(spec.groups)
    perms = random_perms(spec, 5)
    for maps in spec.axes.values():
        for axis_map in maps:
            index = axis_index(axis_map, perms)
            assert sorted(index.tolist()) == list(range(len(index)))
            assert not torch.equal(index, axis_index(axis_map, identity_perms(spec)))
    query = f"{layer}attention.self.query.weight"
    rows = permute_tensor(spec, perms, query, ckpt.tensor(query)).view(4, 8, 32)
    head = perms[f"{layer}attention.heads"][0, 0]
    # new head 0 is old head `head`, its rows by head 0's qk permutation, columns by residual
    want = ckpt.tensor(query).view(4, 8, 32)[head][perms[f"{layer}attention.qk"][0]]
    assert torch.equal(rows[0], want[:, perms["residual"][0]])


def test_cli_permute_writes_a_copy_and_refuses_to_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "cli"
    args = ["permute", str(tiny_zoo().base), str(out), "--seed", "4"]
    assert run_cli(args, monkeypatch, capsys)[0] == 0
    assert tensors_equal(tiny_zoo().base, out)
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"error: {out}: exists") and "--overwrite" in err


def spoiled_copy(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_spec_that_does_not_fit_names_the_tensor(tmp_path: Path) -> None:
    up = "model.layers.1.mlp.up_proj.weight"
    missing = spoiled_copy(tiny_zoo().base, tmp_path / "missing", lambda t: t.pop(up))
    with pytest.raises(PlanError, match=f"tensor {up} missing"):
        derive_spec(Checkpoint(str(missing)))
    short = spoiled_copy(
        tiny_zoo().base, tmp_path / "short", lambda t: t.update({up: t[up][:100].clone()})
    )
    with pytest.raises(PlanError, match=rf"tensor {up} has shape \[100, 64\]"):
        derive_spec(Checkpoint(str(short)))
    extra = spoiled_copy(
        tiny_zoo().base, tmp_path / "extra", lambda t: t.update({"model.adapter.w": t[up].clone()})
    )
    with pytest.raises(PlanError, match=r"tensor model\.adapter\.w is not part of the llama"):
        derive_spec(Checkpoint(str(extra)))
    other = tmp_path / "gpt"
    shutil.copytree(tiny_zoo().base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(PlanError, match="model_type 'gpt2' has no permutation spec"):
        derive_spec(Checkpoint(str(other)))


def test_architectures_that_differ_are_named(tmp_path: Path) -> None:
    llama = derive_spec(Checkpoint(str(tiny_zoo().base)))
    bert = derive_spec(Checkpoint(str(bert_model(tmp_path / "bert", seed=0))))
    with pytest.raises(PlanError, match="architectures differ: base is llama, other is bert"):
        check_same_architecture(llama, bert, "base", "other")
    small = derive_spec(Checkpoint(str(bert_model(tmp_path / "small", seed=0, layers=1))))
    with pytest.raises(PlanError, match=r"tensor bert.encoder.layer.1.\S+ is \[.*\] in a, missing"):
        check_same_architecture(bert, small, "a", "b")
