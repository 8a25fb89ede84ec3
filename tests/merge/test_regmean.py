"""RegMean against an independent least-squares solve on stacked data, and hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from amalgam.errors import MergeError
from tests.merge.data_driven import run


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
