"""Tokenizer transplant: the approximations against independent computations, then real
model folders (safetensors, Hugging Face tokenizers) through the library, the CLI and S3."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from amalgam import storage
from amalgam.align.transplant import TransplantError, transplant
from amalgam.align.transplant.approximate import least_squares_rows, omp, omp_rows
from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.recipe import ModelSpec, Recipe
from amalgam.stages.align import aligned_options
from amalgam.writer import intact
from tests.helpers import run_cli

LETTERS = list("abcdefghijklmnop")
MODEL_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
DONOR_SPECIALS = {"pad": "<|pad|>", "unk": "<unk>", "bos": "<|bos|>", "eos": "<|eos|>"}
#: The donor: other special tokens, letters in reverse order without "p", and three tokens
#: the model lacks ("z" is not even a piece of its vocabulary).
DONOR_TOKENS = [*DONOR_SPECIALS.values(), *reversed(LETTERS[:-1]), "ab", "cde", "z"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def make_tokenizer(tokens: list[str], specials: dict[str, str]) -> PreTrainedTokenizerFast:
    """Whole words as tokens (so "cde" is one token), unknown words as ``<unk>``."""
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, **{f"{role}_token": token for role, token in specials.items()}
    )


def make_model(
    folder: Path,
    tokens: list[str],
    specials: dict[str, str],
    *,
    hidden: int,
    seed: int,
    tied: bool = False,
    weights: bool = True,
) -> Path:
    """A one-layer Llama over ``tokens`` (random weights), saved with its tokenizer."""
    tokenizer = make_tokenizer(tokens, specials)
    tokenizer.save_pretrained(folder)
    if weights:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokens),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=tied,
            **{f"{r}_token_id": tokenizer.convert_tokens_to_ids(t) for r, t in specials.items()},
        )
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def set_rows(folder: Path, rows: dict[str, dict[str, dict[str, float]]]) -> None:
    """Rewrite rows of the model in ``folder``: {tensor: {token: {token: coefficient}}}, each
    row the combination of the other (unchanged) rows."""
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    tensors = load_file(folder / "model.safetensors")
    for name, combos in rows.items():
        for token, combo in combos.items():
            tensors[name][vocab[token]] = sum(c * tensors[name][vocab[t]] for t, c in combo.items())
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def ids(folder: Path) -> dict[str, int]:
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    tokens = [*MODEL_SPECIALS.values(), *LETTERS]
    return make_model(tmp_path / "model", tokens, MODEL_SPECIALS, hidden=16, seed=1)


# -- the approximations -------------------------------------------------------------------------
def test_omp_recovers_an_exactly_sparse_combination() -> None:
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn((40, 32), generator=g)
    support = torch.tensor([[3, 17, 29], [0, 5, 39]])
    weights = torch.tensor([[0.7, -1.2, 0.4], [2.0, 0.5, -0.3]])
    targets = (weights[:, None, :] @ atoms[support])[:, 0]
    picked, coefficients = omp(targets, atoms, 8)
    for row in range(2):
        found = dict(zip(picked[row].tolist(), coefficients[row].tolist(), strict=True))
        assert set(support[row].tolist()) <= set(found)
        for atom, weight in zip(support[row].tolist(), weights[row].tolist(), strict=True):
            assert found[atom] == pytest.approx(weight, abs=1e-4)
        others = [c for a, c in found.items() if a not in support[row].tolist()]
        assert max(map(abs, others)) < 1e-4
    # the same coefficients, applied in another space (another width)
    model_atoms = torch.randn((40, 12), generator=g)
    expected = (weights[:, None, :] @ model_atoms[support])[:, 0]
    torch.testing.assert_close(
        omp_rows(targets, atoms, model_atoms, 8), expected, atol=1e-4, rtol=0
    )


def test_omp_picks_the_most_correlated_atom_first() -> None:
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    picked, coefficients = omp(torch.tensor([[0.1, 3.0]]), atoms, 1)
    assert picked.tolist() == [[1]]
    assert coefficients.tolist() == [[pytest.approx(3.0)]]


def test_least_squares_equals_the_normal_equations() -> None:
    g = torch.Generator().manual_seed(1)
    donor_shared, model_shared = (
        torch.randn((50, 8), generator=g),
        torch.randn((50, 6), generator=g),
    )
    donor_new = torch.randn((5, 8), generator=g)
    x = donor_shared.double()
    mapping = torch.linalg.solve(x.T @ x, x.T @ model_shared.double())
    expected = (donor_new.double() @ mapping).float()
    got = least_squares_rows(donor_new, donor_shared, model_shared)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- real model folders -------------------------------------------------------------------------
def test_omp_transplant_copies_shared_rows_and_recovers_constructed_rows(
    model: Path, tmp_path: Path
) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=32, seed=2)
    combos = {"ab": {"a": 0.7, "k": -0.4}, "cde": {"c": 0.5, "d": 0.3, "e": 0.2}, "z": {"o": 1.5}}
    head_combos = {"ab": {"b": 1.1}, "cde": {"<|eos|>": 0.6, "f": -0.9}, "z": {"g": 0.3, "h": 0.3}}
    set_rows(donor, {EMBED: combos, HEAD: head_combos})
    out = tmp_path / "out"
    done = transplant(str(model), str(donor), str(out), method="omp", k=8)
    assert (done.rows, done.copied, done.approximated) == (len(DONOR_TOKENS), 19, 3)

    m, d = ids(model), ids(donor)
    by_role = {DONOR_SPECIALS[r]: MODEL_SPECIALS[r] for r in DONOR_SPECIALS}
    with open_checkpoint(str(model)) as before, open_checkpoint(str(out)) as after:
        assert after.names() == before.names()
        for name, table_combos in ((EMBED, combos), (HEAD, head_combos)):
            old, new = before.tensor(name), after.tensor(name)
            assert new.shape == (len(DONOR_TOKENS), 16)
            for token, donor_id in d.items():
                if token in table_combos:
                    expected = sum(
                        c * old[m[by_role.get(t, t)]] for t, c in table_combos[token].items()
                    )
                    torch.testing.assert_close(new[donor_id], expected, atol=1e-4, rtol=0)
                else:  # shared: copied bit for bit (special tokens by their role)
                    assert torch.equal(new[donor_id], old[m[by_role.get(token, token)]]), token
        for name in before.names():
            if name not in (EMBED, HEAD):
                assert torch.equal(after.tensor(name), before.tensor(name)), name
    assert intact(*storage.resolve(str(out)))


def test_output_loads_in_transformers_with_the_donor_tokenizer(model: Path, tmp_path: Path) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=24, seed=2)
    out = tmp_path / "out"
    transplant(str(model), str(donor), str(out), method="least_squares")
    tokenizer, donor_tokenizer = (
        AutoTokenizer.from_pretrained(out),
        AutoTokenizer.from_pretrained(donor),
    )
    assert tokenizer.get_vocab() == donor_tokenizer.get_vocab()
    assert tokenizer.eos_token == "<|eos|>"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(DONOR_TOKENS)
    assert config["eos_token_id"] == ids(donor)["<|eos|>"] == loaded.config.eos_token_id
    batch = tokenizer("ab cde z a", return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [ids(donor)[t] for t in ("ab", "cde", "z", "a")]
    with torch.inference_mode():
        logits = loaded(**batch).logits
    assert logits.shape == (1, 4, len(DONOR_TOKENS)) and torch.isfinite(logits).all()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids(donor)["<|eos|>"]


def test_least_squares_recovers_a_linear_relation_between_the_spaces(
    model: Path, tmp_path: Path
) -> None:
    """A donor whose embeddings are the model's times a wide matrix A: the fitted map undoes
    A, so a new token whose donor row is v A gets the row v."""
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=32, seed=2)
    m, d = ids(model), ids(donor)
    model_embed = load_file(model / "model.safetensors")[EMBED]
    tensors = load_file(donor / "model.safetensors")
    mapping = torch.randn((16, 32), generator=torch.Generator().manual_seed(3))
    by_role = {DONOR_SPECIALS[r]: MODEL_SPECIALS[r] for r in DONOR_SPECIALS}
    wanted = {"ab": 0.5 * (model_embed[m["a"]] + model_embed[m["b"]]), "cde": model_embed[m["c"]]}
    wanted["z"] = torch.randn(16, generator=torch.Generator().manual_seed(4))
    for token, donor_id in d.items():
        row = wanted[token] if token in wanted else model_embed[m[by_role.get(token, token)]]
        tensors[EMBED][donor_id] = row @ mapping
    save_file(tensors, donor / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    transplant(str(model), str(donor), str(out), method="least_squares")
    with open_checkpoint(str(out)) as after:
        for token, row in wanted.items():
            torch.testing.assert_close(after.tensor(EMBED)[d[token]], row, atol=1e-4, rtol=1e-4)


def test_subword_needs_only_the_donor_tokenizer_and_a_tied_model_stays_tied(tmp_path: Path) -> None:
    tokens = [*MODEL_SPECIALS.values(), *LETTERS, "ab"]
    model = make_model(tmp_path / "model", tokens, MODEL_SPECIALS, hidden=16, seed=1, tied=True)
    # the model spells "cde" as one unknown word: a tokenizer that cuts letters
    core = json.loads((model / "tokenizer.json").read_text())
    core["pre_tokenizer"] = {
        "type": "Split",
        "pattern": {"Regex": "."},
        "behavior": "Isolated",
        "invert": False,
    }
    (model / "tokenizer.json").write_text(json.dumps(core))
    donor = make_model(
        tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=8, seed=2, weights=False
    )
    out = tmp_path / "out"
    done = transplant(str(model), str(donor), str(out), method="subword")
    assert done.tables == (EMBED,)
    m, d = ids(model), ids(donor)
    with open_checkpoint(str(model)) as before, open_checkpoint(str(out)) as after:
        old, new = before.tensor(EMBED), after.tensor(EMBED)
        assert HEAD not in after.names()
        torch.testing.assert_close(new[d["cde"]], old[[m["c"], m["d"], m["e"]]].mean(0))
        # "ab" is a model token ("a" then "b" after the split, so matched by text, not pieces)
        assert torch.equal(new[d["ab"]], old[m["ab"]])
        torch.testing.assert_close(new[d["z"]], old.mean(0))  # no known piece: the mean row
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_the_donor_chat_template_is_carried(model: Path, tmp_path: Path) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=8, seed=2)
    template = "{% for m in messages %}<|bos|> {{ m['content'] }} <|eos|>{% endfor %}"
    (donor / "chat_template.jinja").write_text(template)
    (model / "chat_template.jinja").write_text("the model's own template")
    out = tmp_path / "out"
    transplant(str(model), str(donor), str(out), method="least_squares")
    assert not (out / "chat_template.jinja").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert tokenizer(text)["input_ids"] == [ids(donor)[t] for t in ("<|bos|>", "ab", "<|eos|>")]


def test_an_adapter_is_transplanted_as_the_dense_model_it_makes(
    model: Path, tmp_path: Path
) -> None:
    from tests.adapters.builders import adapter, peft_merged

    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=32, seed=2)
    lora = adapter(model, tmp_path / "lora", seed=3)
    merged = peft_merged(model, lora, tmp_path / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (merged / name).write_text((model / name).read_text())
    transplant(f"{model}+{lora}", str(donor), str(tmp_path / "a"))
    transplant(str(merged), str(donor), str(tmp_path / "b"))
    with open_checkpoint(str(tmp_path / "a")) as a, open_checkpoint(str(tmp_path / "b")) as b:
        assert a.names() == b.names()
        for name in a.names():
            torch.testing.assert_close(a.tensor(name), b.tensor(name), atol=1e-5, rtol=1e-5)


def test_output_on_s3_equals_local(model: Path, tmp_path: Path, s3) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=32, seed=2)
    bucket = s3.make_bucket(f"transplant-{uuid.uuid4().hex[:8]}")
    fs, opts = s3.filesystem(), s3.storage_options()
    fs.put(str(donor), f"{bucket}/donor", recursive=True)
    remote = f"s3://{bucket}/out"
    transplant(str(model), f"s3://{bucket}/donor", remote, **opts)
    transplant(str(model), str(donor), str(tmp_path / "out"))
    with open_checkpoint(remote, **opts) as a, open_checkpoint(str(tmp_path / "out")) as b:
        assert a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert intact(*storage.resolve(remote, **opts))


def test_transplanting_an_average_equals_averaging_transplants(model: Path, tmp_path: Path) -> None:
    """Every method is one linear map of the model's rows (its coefficients come from the
    donor alone), so two models of one base merge the same before or after a transplant."""
    tokens = [*MODEL_SPECIALS.values(), *LETTERS]
    other = make_model(tmp_path / "other", tokens, MODEL_SPECIALS, hidden=16, seed=7)
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=32, seed=2)

    def average(models: list[Path], out: Path) -> Path:
        recipe = Recipe(method="linear", models=[ModelSpec(uri=str(m)) for m in models])
        run_merge(recipe, MergeOptions(output=str(out), device="cpu"))
        return out

    for method in ("omp", "least_squares", "subword"):
        moved = [tmp_path / f"{method}-{m.name}" for m in (model, other)]
        for source, target in zip((model, other), moved, strict=True):
            transplant(str(source), str(donor), str(target), method=method)
        after = average(moved, tmp_path / f"{method}-after")
        merged = average([model, other], tmp_path / f"{method}-merged")
        before = tmp_path / f"{method}-before"
        transplant(str(merged), str(donor), str(before), method=method)
        with open_checkpoint(str(after)) as a, open_checkpoint(str(before)) as b:
            assert a.names() == b.names()
            for name in a.names():
                torch.testing.assert_close(a.tensor(name), b.tensor(name), atol=1e-5, rtol=1e-5)
        # and the merge did change the vocabulary rows (the check is not vacuous)
        with open_checkpoint(str(after)) as a, open_checkpoint(str(moved[0])) as m:
            assert not torch.equal(a.tensor(EMBED), m.tensor(EMBED))


def test_a_recipe_transplants_onto_the_donor_then_merges(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``align.method: transplant`` in a recipe: the same bytes as a transplant by hand and a
    merge of the donor with it; a re-run reuses the transplanted copy."""
    monkeypatch.setenv("AMALGAM_HOME", str(tmp_path / "home"))
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=16, seed=2)
    by_hand = transplant(str(model), str(donor), str(tmp_path / "by-hand"), method="omp", k=4)
    expected = tmp_path / "expected"
    plain = Recipe(
        method="linear", models=[ModelSpec(uri=str(donor)), ModelSpec(uri=by_hand.output)]
    )
    run_merge(plain, MergeOptions(output=str(expected), device="cpu"))

    align = {"method": "transplant", "transplant": {"donor": "donor", "method": "omp", "k": 4}}
    recipe = Recipe.model_validate(
        {
            "method": "linear",
            "models": [{"uri": str(donor)}, {"uri": str(model)}],
            "align": align,
            "output": str(tmp_path / "merged"),
        }
    )
    for _ in range(2):  # the second run finds the transplanted copy and reuses it
        options = aligned_options(recipe, MergeOptions(device="cpu", overwrite=True))
        (copy,) = [uri for label, uri in options.read_from.items() if label == "model"]
        run_merge(recipe, options)
    assert Path(copy).is_relative_to(tmp_path / "home")
    with open_checkpoint(str(expected)) as a, open_checkpoint(str(tmp_path / "merged")) as b:
        assert a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert ids(tmp_path / "merged") == ids(donor)
    nobody = Recipe.model_validate(
        {**recipe.model_dump(), "align": {**align, "transplant": {"donor": "nobody"}}}
    )
    with pytest.raises(TransplantError, match=r"align.transplant.donor: 'nobody' is not an input"):
        aligned_options(nobody, MergeOptions(device="cpu"))


# -- bad input ----------------------------------------------------------------------------------
def test_no_shared_token_is_refused(model: Path, tmp_path: Path) -> None:
    donor = make_model(tmp_path / "donor", ["<unk>", "X", "Y"], {"unk": "<unk>"}, hidden=8, seed=2)
    # even <unk> is renamed: nothing in common
    core = json.loads((donor / "tokenizer.json").read_text())
    core["model"]["vocab"] = {"<unknown>": 0, "X": 1, "Y": 2}
    core["model"]["unk_token"] = "<unknown>"
    core["added_tokens"] = []
    (donor / "tokenizer.json").write_text(json.dumps(core))
    (donor / "tokenizer_config.json").write_text("{}")
    (donor / "special_tokens_map.json").write_text("{}")
    with pytest.raises(TransplantError, match="share no token"):
        transplant(str(model), str(donor), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_omp_without_donor_weights_names_the_donor(
    model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    donor = make_model(
        tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=8, seed=2, weights=False
    )
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["transplant", str(model), str(donor), "--output", str(out)], monkeypatch, capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: donor ")
    assert (
        str(donor) in lines[0] and "no .safetensors weights" in lines[0] and "subword" in lines[0]
    )
    assert not out.exists()


def test_model_without_tokenizer_names_the_file(model: Path, tmp_path: Path) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=8, seed=2)
    (model / "tokenizer.json").unlink()
    with pytest.raises(TransplantError, match=r"model .*model/tokenizer\.json: no such file"):
        transplant(str(model), str(donor), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_transplant(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=8, seed=2)
    out = tmp_path / "out"
    args = [
        "transplant",
        str(model),
        str(donor),
        "--output",
        str(out),
        "--method",
        "omp",
        "--k",
        "4",
    ]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "19 copied, 3 approximated" in stdout
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "output exists" in err
    code, _, err = run_cli([*args[:-4], "--method", "nearest"], monkeypatch, capsys)
    assert code == 2 and "error: method: 'nearest'" in err


def test_model_without_input_embedding_names_it(model: Path, tmp_path: Path) -> None:
    donor = make_model(tmp_path / "donor", DONOR_TOKENS, DONOR_SPECIALS, hidden=8, seed=2)
    tensors = load_file(model / "model.safetensors")
    tensors["model.tok_embeddings.weight"] = tensors.pop(EMBED)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TransplantError, match=r"model .*: no input embedding tensor"):
        transplant(str(model), str(donor), str(tmp_path / "out"))
    with pytest.raises(TransplantError, match="k: 0 anchors"):
        transplant(str(model), str(donor), str(tmp_path / "out"), k=0)
    assert not (tmp_path / "out").exists()
