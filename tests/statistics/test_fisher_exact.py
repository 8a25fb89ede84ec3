"""The exact Fisher (the default) against a naive sum over the vocabulary, its cache key, its
independence of the seed, many-draw sampling, and the warning when epsilon swamps a Fisher."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import run_merge
from amalgam.recipe import parse_recipe
from amalgam.statistics.artifact import read_info
from amalgam.statistics.compute import cache_path, settings_for
from amalgam.statistics.data import Example, encode
from amalgam.statistics.fisher import fisher_diagonal
from tests.helpers import run_cli
from tests.statistics.test_statistics_compute import exact_fisher, load
from tests.statistics.tiny_models import tiny_llama

EXAMPLES = [Example("ab=", "cd"), Example("sort:31=", "13")]


def flat(fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([fisher[n].reshape(-1) for n in sorted(fisher)])


@pytest.mark.parametrize("tie", [False, True], ids=["untied head", "tied head"])
def test_exact_fisher_equals_a_naive_sum_over_the_vocabulary(tmp_path: Path, tie: bool) -> None:
    """One backward per (scored position, vocabulary token), weighted by its probability,
    averaged over examples: the batched eigen-factored computation gives the same numbers
    (untied head: factored on the head's input, head closed-form; tied: on the logits)."""
    model, tokenizer = load(tiny_llama(tmp_path / "m", seed=0, tie=tie))
    encoded = encode(tokenizer, EXAMPLES, 32)
    want: dict[str, torch.Tensor] = {}
    for enc in encoded:
        for name, f in exact_fisher(model, list(enc.ids), enc.start).items():
            want[name] = want.get(name, 0) + f / len(encoded)
    got, used = fisher_diagonal(model, encoded, "exact")
    assert used == 2 and set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-6 * float(w.abs().max()))


def test_the_scored_tokens_are_the_answers_as_evaluation_scores_them(tmp_path: Path) -> None:
    """No end-of-sequence token is appended or scored: evaluation (quick.choice_correct)
    scores exactly the answer's own tokens after the prompt, and so does the Fisher."""
    _, tokenizer = load(tiny_llama(tmp_path / "m", seed=0))
    (enc,) = encode(tokenizer, [EXAMPLES[1]], 32)
    prompt = tokenizer(EXAMPLES[1].prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(EXAMPLES[1].answer, add_special_tokens=False)["input_ids"]
    assert list(enc.ids) == prompt + answer and enc.start == len(prompt)
    assert tokenizer.eos_token_id not in enc.ids


def test_exact_fisher_does_not_depend_on_the_seed_sampled_does(tmp_path: Path) -> None:
    model, tokenizer = load(tiny_llama(tmp_path / "m", seed=0))
    encoded = encode(tokenizer, EXAMPLES, 32)
    a, _ = fisher_diagonal(model, encoded, "exact", seed=0)
    b, _ = fisher_diagonal(model, encoded, "exact", seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)  # same bits
    s0, _ = fisher_diagonal(model, encoded, "sampled", seed=0)
    s1, _ = fisher_diagonal(model, encoded, "sampled", seed=1)
    assert not torch.equal(flat(s0), flat(s1))


def test_many_draws_approach_the_exact_fisher(tmp_path: Path) -> None:
    """``draws`` labels per example, squared gradients averaged: one example, 400 draws."""
    model, tokenizer = load(tiny_llama(tmp_path / "m", seed=0))
    (enc,) = encode(tokenizer, EXAMPLES[:1], 32)
    exact, _ = fisher_diagonal(model, [enc], "exact")
    drawn, used = fisher_diagonal(model, [enc], "sampled", seed=5, draws=400)
    assert used == 1
    assert flat(drawn).sum().item() == pytest.approx(flat(exact).sum().item(), rel=0.1)
    assert torch.nn.functional.cosine_similarity(flat(drawn), flat(exact), dim=0) > 0.95
    one, _ = fisher_diagonal(model, [enc], "sampled", seed=5, draws=1)
    assert not torch.equal(flat(one), flat(drawn))


def test_the_variant_and_draws_are_part_of_the_cache_key() -> None:
    """The default is exact; an artifact of the former default (sampled, no draws recorded)
    is never read for it, nor a one-draw sampled Fisher for a many-draw one."""
    assert settings_for("fisher") == {"samples": 256, "fisher": "exact"}
    assert settings_for("fisher", fisher="sampled", draws=8)["draws"] == 8
    keys = [
        {"samples": 256, "fisher": "sampled"},  # what the previous default recorded
        settings_for("fisher"),
        settings_for("fisher", fisher="sampled"),
        settings_for("fisher", fisher="sampled", draws=8),
        settings_for("fisher", fisher="empirical"),
    ]
    paths = {cache_path("sha256:m", "sha256:d", "fisher", k) for k in keys}
    assert len(paths) == len(keys)


def test_exact_fisher_merge_is_the_same_whatever_the_seed(home, models, data, tmp_path) -> None:
    """The merge of two models by their (default, exact) Fisher: recipes with other seeds
    give the same bytes."""
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"merged{seed}"
        specs = [{"uri": str(m), "data": str(d)} for m, d in zip(models, data, strict=True)]
        run_merge(parse_recipe({"method": "fisher", "models": specs, "output": str(out),
                                "seed": seed}))  # fmt: skip
        outs.append(out)
    with open_checkpoint(str(outs[0])) as a, open_checkpoint(str(outs[1])) as b:
        assert a.names() == b.names()
        assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names())


def test_epsilon_that_swamps_a_fisher_is_warned_naming_the_model(
    home, models, data, tmp_path, caplog
) -> None:
    specs = [
        {"uri": str(m), "data": str(d), "name": f"expert{i}"}
        for i, (m, d) in enumerate(zip(models, data, strict=True))
    ]
    base = {"method": "fisher", "models": specs}
    with caplog.at_level(logging.WARNING, logger="amalgam.methods.fisher"):
        run_merge(parse_recipe({**base, "output": str(tmp_path / "a")}))
    assert not [r for r in caplog.records if "epsilon" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="amalgam.methods.fisher"):
        run_merge(
            parse_recipe({**base, "output": str(tmp_path / "b"), "params": {"epsilon": 10.0}})
        )
    warned = [r.getMessage() for r in caplog.records if "epsilon 10" in r.getMessage()]
    assert len(warned) == 2
    assert "model expert0" in warned[0] and "model expert1" in warned[1]


def test_stats_command_takes_the_variant_and_draws(
    home, models, data, tmp_path, monkeypatch, capsys
):
    art = tmp_path / "f.safetensors"
    args = ["stats", str(models[0]), "--data", str(data[0]), "--kind", "fisher", "--samples", "2"]
    sampled = ["--fisher", "sampled", "--draws", "3", "--output", str(art)]
    code, _, err = run_cli([*args, *sampled], monkeypatch, capsys)
    assert code == 0, err
    assert read_info(str(art)).settings == {"samples": 2, "fisher": "sampled", "draws": 3}
    code, _, err = run_cli([*args, "--fisher", "sampled", "--draws", "0"], monkeypatch, capsys)
    assert code == 2 and "draws: expected a positive integer" in err
