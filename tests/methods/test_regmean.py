"""RegMean against an independent least-squares solve on stacked data, and hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import MergeError, RecipeError
from amalgam.recipe import parse_recipe
from tests.methods.data_driven import run


def lstsq_merge(
    xs: list[torch.Tensor], ws: list[torch.Tensor], alpha: float, coefs: list[float]
) -> torch.Tensor:
    """argmin_W sum_i c_i/T_i ||X_i W^T - X_i W_i^T||^2 (+ the (1 - alpha) diagonal part as
    extra rows sqrt((1 - alpha) c_i G_i[j, j]) e_j), by torch.linalg.lstsq on stacked rows."""
    rows, targets = [], []
    for x, w, c in zip(xs, ws, coefs, strict=True):
        x = x.double()
        scale = (c / len(x)) ** 0.5
        gram_diag = (x * x).sum(0) / len(x)
        rows += [x * scale * alpha**0.5]
        targets += [x @ w.double().T * scale * alpha**0.5]
        extra = torch.diag(((1 - alpha) * c * gram_diag) ** 0.5)
        rows += [extra]
        targets += [extra @ w.double().T]
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T


def grams(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(x.double().T @ x.double() / len(x)).float() for x in xs]


@pytest.mark.parametrize(("alpha", "coefs"), [(1.0, [1.0, 1.0, 1.0]), (0.6, [1.0, 2.0, 0.5])])
def test_matches_least_squares_on_stacked_data(alpha: float, coefs: list[float]) -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 6, generator=g) for n in (20, 9, 33)]
    ws = [torch.randn(4, 6, generator=g) for _ in xs]
    out = run("regmean", ws, grams(xs), {"alpha": alpha}, coefs)
    torch.testing.assert_close(
        out.double(), lstsq_merge(xs, ws, alpha, coefs), rtol=1e-4, atol=1e-5
    )


def test_one_input_feature_by_hand() -> None:
    # d_in = 1: W* = sum g_i W_i / sum g_i = (1*2 + 3*4) / 4
    out = run(
        "regmean",
        [torch.tensor([[2.0]]), torch.tensor([[4.0]])],
        [torch.tensor([[1.0]]), torch.tensor([[3.0]])],
    )
    torch.testing.assert_close(out, torch.tensor([[3.5]]))


def test_a_feature_no_data_reached_keeps_the_average() -> None:
    """Input feature 2 is zero in every model's data: the sum of Grams is singular; that
    column is the plain average, the rest fit the data exactly (here: one model's inputs
    only touch feature 0, the other's only feature 1)."""
    w1 = torch.tensor([[1.0, 2.0, 3.0]])
    w2 = torch.tensor([[5.0, 6.0, 7.0]])
    g1 = torch.diag(torch.tensor([1.0, 0.0, 0.0]))
    g2 = torch.diag(torch.tensor([0.0, 1.0, 0.0]))
    out = run("regmean", [w1, w2], [g1, g2], {"alpha": 1.0})
    torch.testing.assert_close(out, torch.tensor([[1.0, 6.0, 5.0]]))


def test_tensors_without_grams_are_averaged_and_partial_grams_refused() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 8.0])
    torch.testing.assert_close(
        run("regmean", [a, b], [None, None], weights=[1.0, 3.0]), torch.tensor([2.5, 6.5])
    )
    with pytest.raises(MergeError, match="Gram matrices missing"):
        run("regmean", [a[None], b[None]], [torch.eye(2), None])


def test_embedding_rows_weighted_by_token_shares_by_hand() -> None:
    """Vocabulary of 3, weights 1 and 3. Token 0: shares 0.5 and 0.25, so row 0 weighs the
    models 0.5 : 0.75 = 2 : 3; token 1 only in model 1's data (its row); token 2 in no one's
    data: the weighted average (1 * E_0 + 3 * E_1) / 4."""
    e0 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [8.0, 0.0]])
    e1 = torch.tensor([[6.0, 7.0], [9.0, 9.0], [0.0, 4.0]])
    shares = [torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.0, 0.0])]
    out = run("regmean", [e0, e1], shares, weights=[1.0, 3.0])
    want = torch.tensor([[4.0, 5.0], [3.0, 4.0], [2.0, 3.0]])  # row 0: (2*e0 + 3*e1) / 5
    torch.testing.assert_close(out, want)
    # alpha does not matter: the Gram of one-hot inputs is diagonal
    again = run("regmean", [e0, e1], shares, {"alpha": 0.2}, weights=[1.0, 3.0])
    assert torch.equal(again, out)


@pytest.mark.parametrize("coefs", [[1.0, 1.0, 1.0], [1.0, 2.0, 0.5]])
def test_embedding_matches_least_squares_on_one_hot_inputs(coefs: list[float]) -> None:
    """The embedding as a linear map E^T of one-hot rows: lstsq on each model's stacked
    one-hot token rows gives the same table. Tokens 6 and 7 are in no model's data: lstsq
    runs on the seen tokens' columns (full rank) and the unseen rows are the weighted
    average."""
    g = torch.Generator().manual_seed(2)
    vocab = 8
    ids = [torch.randint(0, 6, (n,), generator=g) for n in (30, 11, 17)]
    tables = [torch.randn(vocab, 5, generator=g) for _ in ids]
    xs = [torch.nn.functional.one_hot(t, vocab).double() for t in ids]
    shares = [x.sum(0).float() / len(x) for x in xs]
    out = run("regmean", tables, shares, {"alpha": 0.5}, coefs).double()
    seen = torch.cat(ids).bincount(minlength=vocab) > 0
    assert seen[:6].all() and not seen[6:].any()
    # W (out x in) = E^T, restricted to the seen tokens
    want = lstsq_merge([x[:, seen] for x in xs], [t[seen].T for t in tables], 1.0, coefs).T
    torch.testing.assert_close(out[seen], want, rtol=1e-5, atol=1e-6)
    avg = sum(t.double() * c for t, c in zip(tables, coefs, strict=True)) / sum(coefs)
    torch.testing.assert_close(out[~seen], avg[~seen])


def test_embeddings_average_is_the_plain_weighted_average() -> None:
    """``embeddings: average`` ignores the token shares: bit for bit the float32 of the
    float64 weighted average (the merge of a tensor without statistics)."""
    g = torch.Generator().manual_seed(3)
    tables = [torch.randn(7, 3, generator=g) for _ in range(3)]
    shares = [torch.rand(7, generator=g) for _ in tables]
    out = run("regmean", tables, shares, {"embeddings": "average"}, [1.0, 2.0, 0.5])
    assert torch.equal(out, run("regmean", tables, [None] * 3, weights=[1.0, 2.0, 0.5]))
    want = (tables[0].double() + 2 * tables[1].double() + 0.5 * tables[2].double()) / 3.5
    assert torch.equal(out, want.float())
    assert not torch.equal(out, run("regmean", tables, shares, weights=[1.0, 2.0, 0.5]))


def test_bad_token_shares_and_embeddings_value_refused() -> None:
    e = [torch.ones(3, 2), torch.zeros(3, 2)]
    with pytest.raises(MergeError, match="tensor 'w': token shares must be 3 long"):
        run("regmean", e, [torch.ones(3), torch.ones(4)])
    with pytest.raises(MergeError, match="tensor 'w': token shares must be 3 long"):
        run("regmean", e, [torch.ones(3), torch.eye(2)])
    models = [{"uri": "a", "data": "a.jsonl"}, {"uri": "b", "data": "b.jsonl"}]
    bad = {"method": "regmean", "models": models, "params": {"embeddings": "lstsq"}}
    with pytest.raises(
        RecipeError, match=r"params\.embeddings: expected one of \['gram', 'average'\]"
    ):
        parse_recipe(bad)
