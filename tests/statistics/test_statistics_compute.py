"""Fisher diagonals and Gram matrices against independent computations on a tiny Llama."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amalgam.checkpoint import open_checkpoint
from amalgam.statistics import compute_statistics
from amalgam.statistics.compute import settings_for
from amalgam.statistics.data import Example, encode, load_examples
from amalgam.statistics.fisher import fisher_diagonal
from amalgam.statistics.gram import gram_matrices
from tests.statistics.tiny_models import RECORDS, tiny_llama, write_jsonl


def load(folder: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def read_all(uri: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(uri) as ckpt:
        return {n: ckpt.tensor(n) for n in ckpt.names()}


def naive_empirical_fisher(folder: Path, examples: list[Example]) -> dict[str, torch.Tensor]:
    """One example at a time: the summed answer-token loss from the model's own label-masked
    cross-entropy (mean x count), its gradient by backward(), squared, averaged."""
    model, tokenizer = load(folder)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for e in examples:
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"] if e.prompt else []
        answer = tokenizer(e.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = ids.clone()
        labels[0, : max(1, len(prompt))] = -100
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss * int((labels != -100).sum())
        loss.backward()
        for n, p in model.named_parameters():
            total[n] += p.grad**2
    return {n: t / len(examples) for n, t in total.items()}


def test_empirical_fisher_matches_per_example_backward(models, data, tmp_path) -> None:
    out = compute_statistics(
        str(models[0]), str(data[0]), "fisher", {"samples": 256, "fisher": "empirical"},
        str(tmp_path / "f.safetensors"),
    )  # fmt: skip
    got = read_all(out.uri)
    examples, data_hash = load_examples(str(data[0]))
    want = naive_empirical_fisher(models[0], examples)
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-10, msg=name)
    assert out.samples == len(examples) and out.data_hash == data_hash
    with open_checkpoint(str(models[0])) as ckpt:
        assert out.model_hash == ckpt.content_hash()
    norm = torch.cat([t.reshape(-1).double() for t in want.values()]).norm().item()
    assert out.norm == pytest.approx(norm, rel=1e-5)


def exact_fisher(model: torch.nn.Module, ids: list[int], start: int) -> dict[str, torch.Tensor]:
    """sum over scored positions t and every token v of p_t(v) (d log p_t(v))^2, enumerating
    the whole vocabulary (one backward per (t, v))."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for t in range(start, len(ids)):
        for v in range(logp.shape[-1]):
            grads = torch.autograd.grad(logp[t - 1, v], list(params.values()), retain_graph=True)
            for n, g in zip(params, grads, strict=True):
                total[n] += logp[t - 1, v].exp().detach() * g**2
    return total


def test_sampled_fisher_estimates_the_model_distribution_fisher(models) -> None:
    """Averaged over many draws on one example, the sampled Fisher approaches the exact
    expectation under the model's own predictive distribution."""
    model, tokenizer = load(models[0])
    (enc,) = encode(tokenizer, [Example("ab=", "cd")], 32)
    want = exact_fisher(model, list(enc.ids), enc.start)
    got, used = fisher_diagonal(model, [enc] * 600, "sampled", seed=3)
    assert used == 600
    flat_got = torch.cat([got[n].reshape(-1) for n in want])
    flat_want = torch.cat([w.reshape(-1) for w in want.values()])
    assert flat_got.sum().item() == pytest.approx(flat_want.sum().item(), rel=0.1)
    assert torch.nn.functional.cosine_similarity(flat_got, flat_want, dim=0) > 0.95
    again, _ = fisher_diagonal(model, [enc] * 600, "sampled", seed=3)
    assert all(torch.equal(again[n], got[n]) for n in got)  # seeded: the same bits


def test_gram_matches_hidden_states_one_example_at_a_time(models, tmp_path) -> None:
    """Grams of three linears against their inputs rebuilt from hidden states, per unpadded
    example: q_proj of layer 1 (its input norm of the layer's input), down_proj of layer 0
    (SiLU(gate) * up of the normed mid-layer state) and lm_head (the final normed state)."""
    records = [{"prompt": "sort:3142=", "answer": "1234"}, {"text": "ab"}, {"text": "zebra!"}]
    data = write_jsonl(tmp_path / "g.jsonl", records)
    out = compute_statistics(
        str(models[0]), str(data), "gram", {"samples": 256}, str(tmp_path / "g.safetensors")
    )
    got = read_all(out.uri)
    model, tokenizer = load(models[0])
    layers = model.model.layers
    xs: dict[str, list[torch.Tensor]] = {"q": [], "down": [], "head": []}
    with torch.no_grad():
        for e in load_examples(str(data))[0]:
            ids = tokenizer(e.prompt + e.answer, add_special_tokens=False)["input_ids"]
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            xs["q"].append(layers[1].input_layernorm(hidden[1])[0])
            h = hidden[0]
            pos = torch.arange(len(ids))[None]
            cos_sin = model.model.rotary_emb(h, pos)
            attn = layers[0].self_attn(layers[0].input_layernorm(h), cos_sin, None)[0]
            mid = layers[0].post_attention_layernorm(h + attn)
            mlp = layers[0].mlp
            xs["down"].append((mlp.act_fn(mlp.gate_proj(mid)) * mlp.up_proj(mid))[0])
            xs["head"].append(hidden[-1][0])
    names = {
        "q": "model.layers.1.self_attn.q_proj.weight",
        "down": "model.layers.0.mlp.down_proj.weight",
        "head": "lm_head.weight",
    }
    tokens = sum(len(x) for x in xs["q"])
    assert out.tokens == tokens
    for key, name in names.items():
        x = torch.cat(xs[key]).double()
        torch.testing.assert_close(got[name].double(), x.T @ x / tokens, rtol=1e-4, atol=1e-6)
    # Every linear layer has one, and the input embedding; nothing else does (norms).
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(got) == linears | {"model.embed_tokens.weight"}


def test_embedding_token_shares_count_the_token_ids(models, tmp_path) -> None:
    """The input embedding's statistic: each token id's count over every example's tokens
    (prompt then answer, counted with a Counter), divided by the token count. 18 examples
    of unequal lengths: two batches, each padded."""
    data = write_jsonl(tmp_path / "t.jsonl", RECORDS * 3)
    out = compute_statistics(
        str(models[0]), str(data), "gram", settings_for("gram"), str(tmp_path / "g.safetensors")
    )
    got = read_all(out.uri)["model.embed_tokens.weight"]
    _, tokenizer = load(models[0])
    counts: Counter[int] = Counter()
    for e in load_examples(str(data))[0]:
        for text in (e.prompt, e.answer):
            counts.update(tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
    tokens = sum(counts.values())
    assert out.tokens == tokens and len(got) == len(tokenizer)
    want = torch.zeros(len(tokenizer), dtype=torch.float64)
    for token, n in counts.items():
        want[token] = n / tokens
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0.0)
    assert tokenizer.pad_token_id not in counts and got[tokenizer.pad_token_id] == 0


def test_tied_input_embedding_has_no_token_shares(tmp_path) -> None:
    """An input embedding shared with lm_head is merged as that linear layer: no vector."""
    model, tokenizer = load(tiny_llama(tmp_path / "tied", seed=0, tie=True))
    assert model.get_input_embeddings().weight is model.lm_head.weight
    encoded = encode(tokenizer, [Example("ab=", "cd")], 32)
    got, tokens = gram_matrices(model, encoded, tokenizer.pad_token_id)
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert tokens == 5 and set(got) == linears and got["lm_head.weight"].shape == (16, 16)


def test_a_cache_miss_reads_the_data_once_and_a_hit_computes_nothing(
    models, data, home, monkeypatch
) -> None:
    import amalgam.statistics.compute as compute

    reads: list[str] = []
    real = compute.load_examples

    def counted(path: str, **options):
        reads.append(path)
        return real(path, **options)

    monkeypatch.setattr(compute, "load_examples", counted)
    settings = settings_for("gram", samples=8)
    info, computed = compute.cached_statistics(str(models[0]), str(data[0]), "gram", settings)
    assert computed and reads == [str(data[0])]
    direct = compute_statistics(
        str(models[0]), str(data[0]), "gram", settings, str(home / "direct.safetensors")
    )
    assert info.content_hash == direct.content_hash
    again, computed = compute.cached_statistics(str(models[0]), str(data[0]), "gram", settings)
    assert not computed and again.content_hash == info.content_hash
