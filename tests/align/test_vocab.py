"""align.method vocab on the tiny zoo: union tokenizer, embedding remap and fill, row ownership
in the merge, tokenizer round trip, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.align import run_align
from amalgam.align.vocab.tokenizers import VocabError
from amalgam.engine.options import MergeOptions
from amalgam.engine.run import run_merge
from amalgam.errors import AmalgamError, PlanError
from amalgam.pipeline import run_pipeline
from amalgam.recipe import AlignSpec, Recipe, TokenizerSpec
from amalgam.zoo import Zoo, build_zoo

REPO = Path(__file__).resolve().parents[2]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
BASE_TOKENS = 373  # the tiny zoo's vocabulary


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    home = Path(os.environ.get("AMALGAM_HOME", REPO / ".amalgam")) / "zoo"
    return build_zoo(home, profile="tiny", log=lambda _: None)


def grow(src: Path, dest: Path, tokens: list[str], seed: int) -> Path:
    """``src`` with ``tokens`` added to its tokenizer and seeded rows appended to its
    embedding and LM head."""
    dest.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(tokens)
    tok.save_pretrained(dest)
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB:
        t = tensors[name]
        tensors[name] = torch.cat([t, torch.randn(len(tokens), t.shape[1], generator=g) * 0.02])
    config = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "vocab_size": len(tok)}))
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def swapped(src: Path, dest: Path, first: str, second: str) -> Path:
    """``src`` with the ids of two tokens exchanged, in its tokenizer and its rows alike (the
    same model under another numbering)."""
    shutil.copytree(src, dest)
    data = json.loads((src / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    i, j = vocab[first], vocab[second]
    vocab[first], vocab[second] = j, i
    (dest / "tokenizer.json").write_text(json.dumps(data))
    tensors = load_file(src / "model.safetensors")
    for name in VOCAB:
        t = tensors[name].clone()
        t[[i, j]] = t[[j, i]]
        tensors[name] = t
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def family(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base; a: + <tool>, Ω; b: + Ω, <call> (Ω under different ids in a and b)."""
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": zoo.base,
        "a": grow(zoo.experts["zoo_caesar"], root / "a", ["<tool>", "Ω"], 1),
        "b": grow(zoo.experts["zoo_sort"], root / "b", ["Ω", "<call>"], 2),
    }


def vocab_recipe(family: dict[str, Path], out: Path, **extra: object) -> Recipe:
    return Recipe.model_validate(
        {
            **extra,
            "method": "task_arithmetic",
            "base": str(family["base"]),
            "models": [
                {"uri": str(family["a"]), "params": {"weight": 0.7}},
                {"uri": str(family["b"]), "params": {"weight": 0.4}},
            ],
            "output": str(out),
            "align": {"method": "vocab"},
        }
    )


def aligned_merge(recipe: Recipe, workdir: Path) -> tuple[dict[str, str], Path]:
    inputs = {"base": recipe.base, **{m.label: m.uri for m in recipe.models}}
    uris = run_align(recipe.align, inputs, workdir=str(workdir))
    run_merge(recipe, MergeOptions(read_from=uris, aligned=True))
    return uris, Path(recipe.output)


def test_union_remap_and_merge_match_a_hand_computation(family, tmp_path):
    recipe = vocab_recipe(family, tmp_path / "out")
    uris, out = aligned_merge(recipe, tmp_path / "work")
    base, a, b = (load_file(family[k] / "model.safetensors") for k in ("base", "a", "b"))
    merged = load_file(out / "model.safetensors")
    tool, omega, call = BASE_TOKENS, BASE_TOKENS + 1, BASE_TOKENS + 2  # union order

    def ta(b0: torch.Tensor, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return b0 + 0.7 * (xa - b0) + 0.4 * (xb - b0)

    for name in VOCAB:
        e0, ea, eb = base[name], a[name], b[name]
        # the aligned copies: own rows in union order; fill = the base's row, else the mean
        # of the rows of the models that have the token
        base_u = torch.cat([e0, ea[[373]], (ea[[374]] + eb[[373]]) / 2, eb[[374]]])
        a_u = torch.cat([ea, eb[[374]]])
        b_u = torch.cat([eb[:373], ea[[373]], eb[[373]], eb[[374]]])
        for label, expected in (("base", base_u), ("a", a_u), ("b", b_u)):
            assert torch.equal(load_file(Path(uris[label]) / "model.safetensors")[name], expected)
        # the merge: shared rows by the method; a row one model owns copied from it
        want = ta(base_u, a_u, b_u)
        want[tool], want[call] = ea[373], eb[374]
        assert torch.allclose(merged[name], want, atol=1e-6), name
        assert torch.equal(merged[name][tool], ea[373])
        assert torch.equal(merged[name][call], eb[374])
        assert not torch.allclose(merged[name][omega], ea[374])  # two owners: merged
    other = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[other], ta(base[other], a[other], b[other]), atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == BASE_TOKENS + 3


def test_union_tokenizer_round_trips_every_input_token(family, tmp_path):
    _, out = aligned_merge(vocab_recipe(family, tmp_path / "out"), tmp_path / "work")
    merged = AutoTokenizer.from_pretrained(out)
    assert merged.convert_ids_to_tokens([373, 374, 375]) == ["<tool>", "Ω", "<call>"]
    for label in ("base", "a", "b"):
        tok = AutoTokenizer.from_pretrained(family[label])
        for token, i in tok.get_vocab().items():
            j = merged.convert_tokens_to_ids(token)
            assert merged.convert_ids_to_tokens(j) == token
            assert merged.decode([j]) == tok.decode([i]), (label, token)
        text = "Ω<tool>" if label == "a" else "<call>Ω"
        if label != "base":
            ids = tok(text, add_special_tokens=False)["input_ids"]
            got = merged(text, add_special_tokens=False)["input_ids"]
            assert merged.convert_ids_to_tokens(got) == tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("init", ["mean", "zero"])
def test_init_fills_rows_a_model_lacks(family, tmp_path, init):
    spec = AlignSpec(method="vocab", tokenizer=TokenizerSpec(init=init))
    uris = run_align(spec, {k: str(v) for k, v in family.items()}, workdir=str(tmp_path))
    a = load_file(family["a"] / "model.safetensors")
    for name in VOCAB:
        row = load_file(Path(uris["a"]) / "model.safetensors")[name][BASE_TOKENS + 2]
        want = a[name].mean(0) if init == "mean" else torch.zeros_like(row)
        assert torch.allclose(row, want, atol=1e-7)


def test_source_model_takes_that_models_vocabulary(family, tmp_path):
    spec = AlignSpec(method="vocab", tokenizer=TokenizerSpec(source="model:b", allow_remap=True))
    uris = run_align(spec, {k: str(v) for k, v in family.items()}, workdir=str(tmp_path))
    a, b = (load_file(family[k] / "model.safetensors") for k in ("a", "b"))
    a_copy = load_file(Path(uris["a"]) / "model.safetensors")
    for name in VOCAB:
        assert a_copy[name].shape[0] == BASE_TOKENS + 2
        assert torch.equal(a_copy[name][373], a[name][374])  # Ω: a's own row, b's id
        assert torch.equal(a_copy[name][374], b[name][374])  # <call>: only b has it
    b_copy = load_file(Path(uris["b"]) / "model.safetensors")  # copied: it carries b's tokenizer
    assert all(torch.equal(b_copy[k], b[k]) for k in b)
    assert len(AutoTokenizer.from_pretrained(uris["a"])) == BASE_TOKENS + 2


def test_identical_vocabularies_merge_byte_identical(zoo, tmp_path):
    models = [{"uri": str(zoo.experts[e])} for e in ("zoo_caesar", "zoo_sort")]
    outputs = {}
    for align in (None, {"method": "vocab"}):
        out = tmp_path / ("vocab" if align else "plain")
        recipe = {"method": "ties", "base": str(zoo.base), "models": models, "output": str(out)}
        run_pipeline(Recipe.model_validate({**recipe, **({"align": align} if align else {})}))
        outputs[out.name] = {p.name: p.read_bytes() for p in out.iterdir()}
    plain, vocab = outputs["plain"], outputs["vocab"]
    # the same header and data bytes; only the recipe hash in the metadata tells them apart
    (head_p, data_p), (head_v, data_v) = (split(o["model.safetensors"]) for o in (plain, vocab))
    assert data_p == data_v
    meta_p, meta_v = head_p.pop("__metadata__"), head_v.pop("__metadata__")
    assert head_p == head_v
    assert meta_p.pop("recipe_hash") != meta_v.pop("recipe_hash")
    assert meta_p == meta_v
    assert plain["tokenizer.json"] == vocab["tokenizer.json"]


def split(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header, data bytes)."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_pipeline_reuses_the_aligned_copies(family, tmp_path, monkeypatch):
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    recipe = vocab_recipe(family, tmp_path / "out")
    run_pipeline(recipe)
    copies = sorted((tmp_path / "home" / "cache" / "aligned").glob("*/*/model.safetensors"))
    assert len(copies) == 3
    stamps = [p.stat().st_mtime_ns for p in copies]
    shutil.rmtree(tmp_path / "out")
    run_pipeline(recipe)
    assert [p.stat().st_mtime_ns for p in copies] == stamps
    assert AutoTokenizer.from_pretrained(tmp_path / "out").convert_ids_to_tokens(375) == "<call>"


def test_shared_token_under_another_id_is_refused_with_source_base(zoo, tmp_path):
    moved = swapped(zoo.experts["zoo_caesar"], tmp_path / "moved", "<pad>", "<unk>")
    inputs = {"base": str(zoo.base), "moved": str(moved)}
    spec = AlignSpec(method="vocab", tokenizer=TokenizerSpec(source="base"))
    with pytest.raises(VocabError, match="token '<unk>' has id 0 in 'moved' but 1 in 'base'"):
        run_align(spec, inputs, workdir=str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
    # allowed: the rows follow the tokens, which gives back the expert as it was
    spec = AlignSpec(method="vocab", tokenizer=TokenizerSpec(source="base", allow_remap=True))
    uris = run_align(spec, inputs, workdir=str(tmp_path / "work"))
    assert uris["base"] == str(zoo.base)
    original = load_file(zoo.experts["zoo_caesar"] / "model.safetensors")
    copy = load_file(Path(uris["moved"]) / "model.safetensors")
    assert original.keys() == copy.keys()
    assert all(torch.equal(original[k], copy[k]) for k in original)


def test_model_choice_naming_no_input_is_refused(family, tmp_path):
    inputs = {k: str(v) for k, v in family.items()}
    for field, spec in (
        ("source", TokenizerSpec(source="model:nope")),
        ("special_tokens", TokenizerSpec(special_tokens="model:nope")),
        ("chat_template", TokenizerSpec(chat_template="model:nope")),
    ):
        with pytest.raises(VocabError, match=f"align.tokenizer.{field}: 'model:nope' names no"):
            run_align(AlignSpec(method="vocab", tokenizer=spec), inputs, workdir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_model_without_tokenizer_files_is_refused(family, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(family["a"] / name, bare / name)
    inputs = {"base": str(family["base"]), "bare": str(bare)}
    with pytest.raises(VocabError, match=r"model 'bare' \(.*bare\): no tokenizer files"):
        run_align(AlignSpec(method="vocab"), inputs, workdir=str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_chat_template_and_special_tokens_follow_the_recipe(family, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    spec = AlignSpec(
        method="vocab", tokenizer=TokenizerSpec(chat_template=template, special_tokens="model:a")
    )
    uris = run_align(spec, {k: str(v) for k, v in family.items()}, workdir=str(tmp_path))
    tok = AutoTokenizer.from_pretrained(uris["base"])
    assert tok.chat_template == template
    assert tok.eos_token == "</s>"
    assert json.loads((Path(uris["base"]) / "config.json").read_text())["eos_token_id"] == 3


@pytest.mark.slow
def test_row_groups_merge_the_same_on_ray(family, tmp_path):
    recipe = vocab_recipe(family, tmp_path / "x", max_shard_size=60_000)
    inputs = {"base": recipe.base, **{m.label: m.uri for m in recipe.models}}
    uris = run_align(recipe.align, inputs, workdir=str(tmp_path / "work"))
    outputs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        run_merge(
            recipe, MergeOptions(read_from=uris, aligned=True, output=str(out), executor=executor)
        )
        outputs[executor] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sum(n.endswith(".safetensors") for n in outputs["local"]) > 2
    assert outputs["local"] == outputs["ray"]


def test_a_changed_tokenizer_rewrites_the_reused_copies(family, tmp_path):
    inputs = {k: str(v) for k, v in family.items()}
    spec = AlignSpec(method="vocab")
    first = run_align(spec, inputs, workdir=str(tmp_path / "work"))
    renamed = tmp_path / "b2"
    shutil.copytree(family["b"], renamed)  # the same weights, <call> renamed to <ask>
    data = (renamed / "tokenizer.json").read_text().replace("<call>", "<ask>")
    (renamed / "tokenizer.json").write_text(data)
    again = run_align(spec, {**inputs, "b": str(renamed)}, workdir=str(tmp_path / "work"))
    assert again == first
    tok = AutoTokenizer.from_pretrained(again["a"])
    assert tok.convert_ids_to_tokens(BASE_TOKENS + 2) == "<ask>"


def test_inputs_on_s3(family, s3, tmp_path):
    fs = s3.filesystem()
    bucket = s3.make_bucket("vocab-inputs")
    for label, folder in family.items():
        fs.put(str(folder), f"{bucket}/{label}", recursive=True)
    remote = {label: f"s3://{bucket}/{label}" for label in family}
    local = run_align(
        AlignSpec(method="vocab"),
        {k: str(v) for k, v in family.items()},
        workdir=str(tmp_path / "local"),
    )
    uris = run_align(
        AlignSpec(method="vocab"), remote, workdir=str(tmp_path / "s3"), **s3.storage_options()
    )
    for label in family:
        mine = {p.name: p.read_bytes() for p in Path(uris[label]).iterdir()}
        theirs = {p.name: p.read_bytes() for p in Path(local[label]).iterdir()}
        assert mine.keys() == theirs.keys()
        assert mine["model.safetensors"] == theirs["model.safetensors"]
        assert mine["tokenizer.json"] == theirs["tokenizer.json"]


def test_configured_token_rows(family, tmp_path):
    tokens = {
        "Ω": {"source": "model:a", "force": True},  # every input takes a's row; only a owns it
        "<call>": {"source": "zero"},  # the inputs that lack it get zeros
        "<new>": {"source": "zero"},  # no input has it: added to the vocabulary
    }
    recipe = vocab_recipe(family, tmp_path / "out")
    align = AlignSpec(method="vocab", tokenizer=TokenizerSpec.model_validate({"tokens": tokens}))
    recipe = recipe.model_copy(update={"align": align})
    uris, out = aligned_merge(recipe, tmp_path / "work")
    a, b = (load_file(family[k] / "model.safetensors") for k in ("a", "b"))
    omega, call, new = BASE_TOKENS + 1, BASE_TOKENS + 2, BASE_TOKENS + 3
    merged = load_file(out / "model.safetensors")
    for name in VOCAB:
        copies = {k: load_file(Path(u) / "model.safetensors")[name] for k, u in uris.items()}
        assert all(torch.equal(c[omega], a[name][374]) for c in copies.values())
        assert torch.equal(merged[name][omega], a[name][374])
        assert not copies["a"][call].any() and not copies["base"][call].any()
        assert torch.equal(copies["b"][call], b[name][374])
        assert all(not c[new].any() for c in copies.values())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(new) == "<new>"


def test_configured_token_source_must_have_the_token(family, tmp_path):
    spec = TokenizerSpec.model_validate({"tokens": {"<tool>": {"source": "model:b"}}})
    inputs = {k: str(v) for k, v in family.items()}
    with pytest.raises(VocabError, match=r"align.tokenizer.tokens.<tool>.source: 'b' has no"):
        run_align(AlignSpec(method="vocab", tokenizer=spec), inputs, workdir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_data_statistics_methods_refuse_partly_owned_rows(family, tmp_path):
    uris = run_align(
        AlignSpec(method="vocab"),
        {k: str(v) for k, v in family.items()},
        workdir=str(tmp_path / "work"),
    )
    recipe = Recipe.model_validate(
        {
            "method": "fisher",
            "models": [{"uri": str(family[k]), "data": "x.jsonl"} for k in ("a", "b")],
            "output": str(tmp_path / "out"),
        }
    )
    with pytest.raises(PlanError, match=r"fisher needs data statistics per model.*embed_tokens"):
        run_merge(recipe, MergeOptions(read_from=uris, aligned=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ("{not json", "malformed"),
        ('{"rows": 376, "owned": [[0, 400]], "tensors": []}', "owned ranges outside 0..376"),
        (
            '{"rows": 10, "owned": [[0, 5]], "tensors": ["lm_head.weight"]}',
            "10 rows of 'lm_head.weight', the tensor has 376",
        ),
    ],
)
def test_a_bad_ownership_sidecar_is_refused_naming_it(family, tmp_path, sidecar, message):
    uris = run_align(
        AlignSpec(method="vocab"),
        {k: str(v) for k, v in family.items()},
        workdir=str(tmp_path / "work"),
    )
    (Path(uris["b"]) / "amalgam-rows.json").write_text(sidecar)
    recipe = vocab_recipe(family, tmp_path / "out")
    with pytest.raises(
        AmalgamError, match=rf"{uris['b']}/amalgam-rows.json: .*{re.escape(message)}"
    ):
        run_merge(recipe, MergeOptions(read_from=uris, aligned=True))


def test_tied_embeddings_are_remapped_once(family, tmp_path):
    tied = {}
    for label, folder in family.items():  # the same models, with the LM head tied
        dest = tmp_path / "tied" / label
        shutil.copytree(folder, dest)
        tensors = load_file(folder / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        tied[label] = dest
    _, out = aligned_merge(vocab_recipe(tied, tmp_path / "out"), tmp_path / "work")
    merged = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in merged
    a = load_file(tied["a"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(merged["model.embed_tokens.weight"][BASE_TOKENS], a[373])  # <tool>
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.shape[0] == BASE_TOKENS + 3
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)


def test_pad_to_multiple_of_pads_with_each_models_mean_row(family, tmp_path):
    recipe = vocab_recipe(family, tmp_path / "out")
    align = AlignSpec(method="vocab", tokenizer=TokenizerSpec(pad_to_multiple_of=64))
    uris, out = aligned_merge(recipe.model_copy(update={"align": align}), tmp_path / "work")
    for label in ("a", "b"):
        own = load_file(family[label] / "model.safetensors")
        copy = load_file(Path(uris[label]) / "model.safetensors")
        for name in VOCAB:
            assert copy[name].shape[0] == 384  # 376 tokens, padded to 6 x 64
            mean = own[name].mean(0)
            assert all(torch.allclose(row, mean, atol=1e-7) for row in copy[name][376:])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 384
    assert len(AutoTokenizer.from_pretrained(out)) == 376
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape[0] == 384


def padded(src: Path, dest: Path, rows: int, seed: int) -> Path:
    """``src`` with its embedding and LM head padded to ``rows`` rows (seeded values); its
    tokenizer unchanged."""
    shutil.copytree(src, dest)
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB:
        t = tensors[name]
        tensors[name] = torch.cat([t, torch.randn(rows - t.shape[0], t.shape[1], generator=g)])
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return dest


def test_padding_rows_are_kept(zoo, family, tmp_path):
    # one vocabulary, padded alike: nothing to align
    same = {
        label: str(padded(src, tmp_path / label, 400, i))
        for i, (label, src) in enumerate(
            (("base", zoo.base), ("x", zoo.experts["zoo_sort"]), ("y", zoo.experts["zoo_count"]))
        )
    }
    assert run_align(AlignSpec(method="vocab"), same, workdir=str(tmp_path / "w1")) == same
    # a padded base under the union: its padding past the new tokens is kept, and a model
    # without padding takes its mean row there
    inputs = {**{k: str(v) for k, v in family.items()}, "base": same["base"]}
    uris = run_align(AlignSpec(method="vocab"), inputs, workdir=str(tmp_path / "w2"))
    base = load_file(Path(same["base"]) / "model.safetensors")
    a = load_file(family["a"] / "model.safetensors")
    for name in VOCAB:
        base_copy = load_file(Path(uris["base"]) / "model.safetensors")[name]
        a_copy = load_file(Path(uris["a"]) / "model.safetensors")[name]
        assert base_copy.shape[0] == a_copy.shape[0] == 400
        assert torch.equal(base_copy[376:], base[name][376:])
        assert torch.allclose(a_copy[376:], a[name].mean(0).expand(24, -1), atol=1e-7)


def test_continual_merge_carries_rows_only_one_model_has(family, tmp_path):
    recipe = Recipe.model_validate(
        {
            "method": "continual_avg",
            "base": str(family["base"]),
            "models": [{"uri": str(family["a"])}, {"uri": str(family["b"])}],
            "output": str(tmp_path / "out"),
            "align": {"method": "vocab"},
        }
    )
    _, out = aligned_merge(recipe, tmp_path / "work")
    merged = load_file(out / "model.safetensors")
    a, b = (load_file(family[k] / "model.safetensors") for k in ("a", "b"))
    for name in VOCAB:
        assert torch.allclose(merged[name][:373], (a[name][:373] + b[name][:373]) / 2, atol=1e-6)
        assert torch.equal(merged[name][373], a[name][373])  # <tool>: a's, kept by step 2
        assert torch.allclose(merged[name][374], (a[name][374] + b[name][373]) / 2, atol=1e-6)
