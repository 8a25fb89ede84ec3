"""Synthetic tasks of the MiniLM zoo, made from templates; the base encoder gets them wrong
where word overlap misleads it (negation, who did what to whom), so fine-tunes have room."""

from __future__ import annotations

import random
from typing import Any

ITEMS = [
    "soup",
    "movie",
    "hotel",
    "concert",
    "laptop",
    "service",
    "book",
    "coffee",
    "game",
    "trip",
    "pizza",
    "phone",
    "lecture",
    "garden",
    "museum",
    "train",
    "jacket",
    "song",
    "camera",
    "park",
]
GOOD = ["good", "great", "pleasant", "excellent", "lovely", "enjoyable", "wonderful", "fine"]
BAD = ["bad", "awful", "terrible", "boring", "poor", "dreadful", "unpleasant", "horrible"]
SENTIMENT_TEMPLATES = [
    "the {item} was {neg}{adj}.",
    "honestly, the {item} is {neg}{adj}.",
    "i think this {item} was {neg}{adj} overall.",
    "our {item} turned out {neg}{adj}.",
    "everyone said the {item} was {neg}{adj}.",
    "in my view the {item} is {neg}{adj}.",
]
NEGATIONS = ["not ", "never ", "not at all "]

NAMES = [
    "alice",
    "bob",
    "carol",
    "david",
    "emma",
    "frank",
    "grace",
    "henry",
    "irene",
    "jack",
    "karen",
    "leo",
    "maria",
    "nathan",
    "olivia",
    "peter",
    "quinn",
    "rachel",
    "sam",
    "tina",
    "uma",
    "victor",
    "wendy",
    "xavier",
]
VERBS = [
    ("hired", "was hired by"),
    ("called", "was called by"),
    ("helped", "was helped by"),
    ("visited", "was visited by"),
    ("paid", "was paid by"),
    ("thanked", "was thanked by"),
    ("warned", "was warned by"),
    ("invited", "was invited by"),
    ("taught", "was taught by"),
    ("followed", "was followed by"),
]


def sentiment(rng: random.Random, templates: list[str], n: int) -> list[dict[str, Any]]:
    """Texts labelled positive/negative; half are negated, which flips the adjective's sign."""
    out = []
    for _ in range(n):
        positive_word, negated = rng.random() < 0.5, rng.random() < 0.5
        adj = rng.choice(GOOD if positive_word else BAD)
        neg = rng.choice(NEGATIONS) if negated else ""
        text = rng.choice(templates).format(item=rng.choice(ITEMS), neg=neg, adj=adj)
        label = "positive" if positive_word != negated else "negative"
        out.append({"text": text, "label": label})
    return out


def role_triples(rng: random.Random, names: list[str]) -> list[tuple[str, str, str]]:
    """Every (agent, verb, patient) of distinct ``names``, shuffled."""
    triples = [(a, v, p) for a in names for p in names if a != p for v, _ in VERBS]
    rng.shuffle(triples)
    return triples


def passive(agent: str, verb: str, patient: str) -> str:
    return f"{patient} {dict(VERBS)[verb]} {agent}."


def retrieval_split(
    rng: random.Random, names: list[str], n_queries: int
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """A corpus of active sentences (each with its role-swapped twin) and passive queries whose
    one relevant document states the same event; the twin shares every word."""
    corpus: dict[str, str] = {}
    queries = []
    for agent, verb, patient in role_triples(rng, names)[:n_queries]:
        for a, p in ((agent, patient), (patient, agent)):
            corpus[f"{a}-{verb}-{p}"] = f"{a} {verb} {p}."
        queries.append(
            {"query": passive(agent, verb, patient), "relevant": {f"{agent}-{verb}-{patient}": 1}}
        )
    docs = [{"id": k, "text": v} for k, v in sorted(corpus.items())]
    return docs, queries
