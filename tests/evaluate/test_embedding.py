"""The embedding scorer on the MiniLM zoo: pooling as sentence-transformers does it, task figures
equal to loop computations, and models that do not fit their tasks refused by the CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from amalgam.evaluate.embedding import (
    Encoder,
    Pooling,
    architecture,
    pool,
    read_pooling,
    score_task,
)
from amalgam.evaluate.embedding_tasks import read_records
from amalgam.evaluate.taskdir import EvaluationError
from tests.evaluate import naive_embedding as naive
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_encoder(zoo_minilm) -> Encoder:
    return Encoder(zoo_minilm.base, "cpu", 64)


def test_encoder_matches_sentence_transformers(zoo_minilm, base_encoder) -> None:
    # the reference implementation of the model's modules.json (Transformer, Pooling, Normalize)
    from sentence_transformers import SentenceTransformer

    texts = ["the soup was not good.", "alice hired bob.", "a much longer sentence " * 8]
    reference = SentenceTransformer(str(zoo_minilm.base), device="cpu").encode(texts)
    got = base_encoder.encode(texts)
    assert base_encoder.pooling == Pooling(modes=("mean_tokens",), normalize=True)
    np.testing.assert_allclose(got, reference, atol=2e-5)


@pytest.mark.parametrize("modes", [("cls_token",), ("max_tokens",), ("mean_sqrt_len_tokens",)])
def test_pool_modes_match_loops(modes) -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = pool(torch.tensor(hidden), torch.tensor(mask), Pooling(modes=modes)).numpy()
    for b in range(2):
        tokens = [hidden[b, t] for t in range(4) if mask[b, t]]
        want = {
            "cls_token": hidden[b, 0],
            "max_tokens": np.max(tokens, axis=0),
            "mean_sqrt_len_tokens": np.sum(tokens, axis=0) / np.sqrt(len(tokens)),
        }[modes[0]]
        np.testing.assert_allclose(got[b], want, rtol=1e-6)


def test_read_pooling_from_sentence_transformers_files(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert read_pooling(tmp_path) == Pooling()  # no modules.json: mean, and a warning
    assert "mean pooling" in caplog.text
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == Pooling(modes=("cls_token",), normalize=False)
    config.write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(EvaluationError, match="weightedmean_tokens is not supported"):
        read_pooling(tmp_path)


def test_classification_equals_loop_computation(zoo_minilm, base_encoder) -> None:
    tasks = zoo_minilm.tasks_dir
    result = score_task(base_encoder, tasks, "sentiment", "test", None)
    train = read_records(tasks, "sentiment", "train", ("text", "label"))
    test = read_records(tasks, "sentiment", "test", ("text", "label"))
    predicted = naive.nearest_centroid(
        base_encoder.encode([r["text"] for r in train]),
        [r["label"] for r in train],
        base_encoder.encode([r["text"] for r in test]),
    )
    correct = [p == r["label"] for p, r in zip(predicted, test, strict=True)]
    assert result.metric == "acc" and result.higher_is_better
    assert result.correct == correct
    assert result.accuracy == pytest.approx(sum(correct) / len(correct))
    assert 0.5 < result.accuracy < 0.9  # the base is fooled by negation, not hopeless


def test_retrieval_equals_loop_computation(zoo_minilm, base_encoder) -> None:
    from amalgam.evaluate.embedding import retrieval_figures

    tasks = zoo_minilm.tasks_dir
    queries = read_records(tasks, "roles", "test", ("query", "relevant"))
    corpus = read_records(tasks, "roles", "corpus", ("id", "text"))
    q = base_encoder.encode([r["query"] for r in queries])
    d = base_encoder.encode([r["text"] for r in corpus])
    index = {r["id"]: i for i, r in enumerate(corpus)}
    per_query = [
        naive.ndcg_recall(q[i], d, {index[k]: g for k, g in r["relevant"].items()}, 10)
        for i, r in enumerate(queries)
    ]
    result = score_task(base_encoder, tasks, "roles", "test", None)
    assert result.metric == "ndcg@10" and result.correct == []
    assert result.accuracy == pytest.approx(np.mean([n for n, _ in per_query]), abs=1e-9)
    figures = retrieval_figures(base_encoder, tasks, "roles", queries, 10, [10], "roles")
    assert figures["recall@10"] == pytest.approx(np.mean([r for _, r in per_query]), abs=1e-9)
    assert 0.3 < result.accuracy < 0.95


def test_sts_equals_spearman_of_ranks(tmp_path, base_encoder) -> None:
    pairs = [
        ("the soup was good.", "the soup was great.", 4.5),
        ("the soup was good.", "the soup was not good.", 1.0),
        ("alice hired bob.", "bob was hired by alice.", 5.0),
        ("alice hired bob.", "the train was late.", 0.0),
        ("the movie was boring.", "the film was dull.", 4.0),
        ("the park is lovely.", "our hotel was awful.", 0.5),
        ("i liked the concert.", "the concert was enjoyable.", 4.0),
    ]
    task = tmp_path / "pairs"
    task.mkdir()
    (task / "embedding.json").write_text('{"type": "sts"}')
    (task / "test.jsonl").write_text(
        "".join(json.dumps({"text1": a, "text2": b, "score": s}) + "\n" for a, b, s in pairs)
    )
    result = score_task(base_encoder, tmp_path, "pairs", "test", None)
    a = base_encoder.encode([p[0] for p in pairs])
    b = base_encoder.encode([p[1] for p in pairs])
    sims = [naive.cos(x, y) for x, y in zip(a, b, strict=True)]
    assert result.metric == "spearman" and result.correct == []
    assert result.accuracy == pytest.approx(naive.spearman(sims, [p[2] for p in pairs]))
    (task / "test.jsonl").write_text(
        "".join(json.dumps({"text1": a, "text2": b, "score": 1.0}) + "\n" for a, b, _ in pairs)
    )
    with pytest.raises(EvaluationError, match=r"pairs/test\.jsonl: Spearman is undefined"):
        score_task(base_encoder, tmp_path, "pairs", "test", None)


def assert_one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_cli_refuses_lm_tasks_on_an_encoder(zoo_minilm, zoo_tiny, monkeypatch, capsys) -> None:
    task = zoo_tiny.task_names[0]
    args = ["evaluate", str(zoo_minilm.base), "--tasks-dir", str(zoo_tiny.tasks_dir)]
    code, _, err = run_cli([*args, "--tasks", task, "--device", "cpu"], monkeypatch, capsys)
    assert_one_error(code, err, "BertModel", "encoder", task, "classification, retrieval, sts")
    assert "MISSING" not in err and "LMHead" not in err


def test_cli_refuses_embedding_tasks_on_a_causal_lm(
    zoo_minilm, zoo_tiny, monkeypatch, capsys
) -> None:
    args = ["evaluate", str(zoo_tiny.base), "--tasks-dir", str(zoo_minilm.tasks_dir)]
    code, _, err = run_cli([*args, "--tasks", "roles", "--device", "cpu"], monkeypatch, capsys)
    assert_one_error(code, err, "LlamaForCausalLM", "roles", "lm-eval tasks")


def test_cli_scores_an_encoder_on_its_tasks(zoo_minilm, monkeypatch, capsys) -> None:
    folder = zoo_minilm.experts["sentiment"]
    args = ["evaluate", str(folder), "--tasks-dir", str(zoo_minilm.tasks_dir), "--limit", "40"]
    code, out, _ = run_cli([*args, "--tasks", "sentiment", "--device", "cpu"], monkeypatch, capsys)
    assert code == 0
    expected = score_task(Encoder(folder, "cpu"), zoo_minilm.tasks_dir, "sentiment", "test", 40)
    assert f"{expected.accuracy:.4f}" in out and "sentiment" in out


def test_bad_task_folders_name_the_file(tmp_path, base_encoder) -> None:
    task = tmp_path / "bad"
    task.mkdir()
    (task / "embedding.json").write_text('{"type": "clustering"}')
    with pytest.raises(EvaluationError, match=r"bad/embedding.json: type"):
        score_task(base_encoder, tmp_path, "bad", "test", None)
    (task / "embedding.json").write_text('{"type": "retrieval"}')
    (task / "corpus.jsonl").write_text('{"id": "d1", "text": "alice hired bob."}\n')
    (task / "test.jsonl").write_text('{"query": "who hired bob?", "relevant": ["d9"]}\n')
    with pytest.raises(EvaluationError, match=r"bad/test.jsonl:1: unknown document id\(s\) d9"):
        score_task(base_encoder, tmp_path, "bad", "test", None)
    (task / "test.jsonl").write_text('{"query": "who hired bob?"}\n')
    with pytest.raises(EvaluationError, match=r"bad/test.jsonl:1: missing field\(s\) relevant"):
        score_task(base_encoder, tmp_path, "bad", "test", None)


@pytest.mark.parametrize(
    ("config", "sentence_transformers", "encoder"),
    [
        ({"architectures": ["BertModel"]}, False, True),
        ({"architectures": ["BertForSequenceClassification"]}, False, True),
        ({"architectures": ["LlamaForCausalLM"]}, False, False),
        ({"architectures": ["GPT2LMHeadModel"]}, False, False),
        ({"architectures": ["T5ForConditionalGeneration"]}, True, False),
        ({"architectures": ["BertModel"], "is_decoder": True}, False, False),
        ({"model_type": "bert"}, True, True),
        ({"model_type": "bert"}, False, False),
        (None, False, False),  # an adapter folder: lm-eval loads it over its base
    ],
)
def test_architecture_decides_the_scorer(tmp_path, config, sentence_transformers, encoder) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if sentence_transformers:
        (tmp_path / "modules.json").write_text("[]")
    assert architecture(tmp_path)[1] is encoder
