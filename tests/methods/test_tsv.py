"""TSV-M against hand-worked cases and a numpy whitening formulation of the paper's equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.methods.svd import polar, top_singular
from amalgam.recipe import parse_recipe

from .naive_subspace import tsv_matrix


def outer(m: int, n: int, i: int, j: int, value: float) -> torch.Tensor:
    t = torch.zeros(m, n)
    t[i, j] = value
    return t


def test_orthogonal_rank_one_task_vectors_give_their_sum(merge):
    # Task vectors 2 e0 f1^T, -3 e2 f0^T, 0.5 e3 f3^T: rank 1 each, mutually orthogonal left and
    # right vectors. k = floor(4 / 3) = 1 triplet each; the stacked U and V are already
    # orthonormal, so the polar step changes nothing and TSV-M is task arithmetic.
    base = torch.arange(20.0).reshape(4, 5) / 10
    deltas = [outer(4, 5, 0, 1, 2.0), outer(4, 5, 2, 0, -3.0), outer(4, 5, 3, 3, 0.5)]
    out = merge("tsv_m", base, [base + d for d in deltas])
    torch.testing.assert_close(out, base + sum(deltas), rtol=0, atol=1e-6)


def test_rank_one_tasks_sharing_a_direction_by_hand(merge):
    # d1 = 3 e0 f0^T, d2 = 4 u f1^T with u = (e0 + e1)/sqrt2, in 2x2, k = 1 each.
    # U_hat = [e0, u]: unit columns at angles 0 and pi/4. Its polar factor (nearest orthogonal
    # matrix) keeps the columns' bisector (pi/8) and spreads them to 90 degrees apart:
    # angles -pi/8 and 3pi/8. V_hat = [f0, f1] is orthonormal already.
    # Result: 3 u1' f0^T + 4 u2' f1^T.
    s = 2**-0.5
    base = torch.zeros(2, 2)
    d1 = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    d2 = torch.tensor([[0.0, 4 * s], [0.0, 4 * s]])
    out = merge("tsv_m", base, [d1, d2])
    a, b = -np.pi / 8, 3 * np.pi / 8
    expected = torch.tensor(
        [[3 * np.cos(a), 4 * np.cos(b)], [3 * np.sin(a), 4 * np.sin(b)]], dtype=torch.float32
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_one_dimensional_tensors_take_the_weighted_mean(merge):
    # (2 * [1, 2] + 1 * [3, -2]) / 2 = [2.5, 1]; lambda 2 -> base + [5, 2]
    base = torch.tensor([1.0, 1.0])
    out = merge(
        "tsv_m",
        base,
        [base + torch.tensor([1.0, 2.0]), base + torch.tensor([3.0, -2.0])],
        params={"lambda": 2.0},
        models=[{"weight": 2.0}, {"weight": 1.0}],
    )
    assert torch.equal(out, torch.tensor([6.0, 3.0]))


def test_more_models_than_rank_and_svd_none_take_the_mean(merge):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, generator=g)
    inputs = [base + torch.randn(2, 6, generator=g) for _ in range(3)]
    mean = base + sum(x - base for x in inputs) / 3
    torch.testing.assert_close(merge("tsv_m", base, inputs), mean)  # r = 2 < 3 models: k = 0
    square = torch.randn(6, 6, generator=g)
    inputs = [square + torch.randn(6, 6, generator=g) for _ in range(3)]
    out = merge(
        "tsv_m",
        square,
        inputs,
        name="model.embed_tokens.weight",
        overrides=[{"match": "embed_tokens", "params": {"svd": "none"}}],
    )
    torch.testing.assert_close(out, square + sum(x - square for x in inputs) / 3)


def test_untouched_expert_leaves_the_others_truncated_svd(merge):
    # An expert equal to the base has no singular directions: they are dropped, not allowed to
    # rotate the others. With N = 2, k = 3: the result is the rank-3 truncation of d1.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 7, generator=g)
    d1 = torch.randn(6, 7, generator=g)
    out = merge("tsv_m", base, [base + d1, base.clone()])
    u, s, vt = np.linalg.svd(d1.double().numpy())
    expected = base.double().numpy() + (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5)


def test_identical_experts_give_one_truncation_not_their_sum(merge):
    # Two experts with the same task vector d: U_hat = [U_k, U_k] = U_k [I, I] has rank k. Its
    # partial isometry is U_k [I, I] / sqrt2 (likewise for V), so the merge is
    # sum over both blocks of (U_k / sqrt2) S_k (V_k / sqrt2)^T = U_k S_k V_k^T: the rank-k
    # truncation of d once (the full polar factor would add an arbitrary null-space term).
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g)
    d = torch.randn(6, 8, generator=g)
    out = merge("tsv_m", base, [base + d, base + d])
    u, s, vt = np.linalg.svd(d.double().numpy())
    expected = base.double().numpy() + (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(("shape", "n"), [((6, 7), 3), ((9, 4), 2), ((12, 12), 4), ((5, 8), 5)])
def test_matches_numpy_whitening_formulation(merge, shape, n):
    g = torch.Generator().manual_seed(sum(shape) + n)
    base = torch.randn(shape, generator=g)
    inputs = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    weights = [1.0 + 0.25 * i for i in range(n)]
    out = merge(
        "tsv_m",
        base,
        inputs,
        params={"lambda": 0.7},
        models=[{"weight": w} for w in weights],
    )
    b = base.double().numpy()
    deltas = [w * (x.double().numpy() - b) for x, w in zip(inputs, weights, strict=True)]
    np.testing.assert_allclose(out.double().numpy(), b + tsv_matrix(deltas, 0.7), atol=2e-5)


def test_bf16_inputs_are_merged_in_float32(merge):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, generator=g).bfloat16()
    inputs = [(base.float() + 0.1 * torch.randn(8, 6, generator=g)).bfloat16() for _ in range(2)]
    out = merge("tsv_m", base, inputs)
    assert out.dtype == torch.float32
    b = base.double().numpy()
    deltas = [x.double().numpy() - b for x in inputs]
    np.testing.assert_allclose(out.double().numpy(), b + tsv_matrix(deltas, 1.0), atol=2e-5)


def test_lowrank_svd_recovers_low_rank_task_vectors(merge):
    # Task vectors of rank 5 <= k = floor(60 / 2) = 30 in 80x60: the randomized range finder
    # (sketch of 40 columns < 60) spans them exactly, so low-rank and full SVD agree.
    g = torch.Generator().manual_seed(6)
    base = torch.randn(80, 60, generator=g)
    inputs = [
        base + torch.randn(80, 5, generator=g) @ torch.randn(5, 60, generator=g) for _ in range(2)
    ]
    full = merge("tsv_m", base, inputs)
    low = merge("tsv_m", base, inputs, params={"svd": "lowrank"})
    torch.testing.assert_close(low, full, rtol=0, atol=1e-4)
    assert torch.equal(low, merge("tsv_m", base, inputs, params={"svd": "lowrank"}))


def test_top_singular_lowrank_close_to_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(7)
    q1 = torch.linalg.qr(torch.randn(200, 100, generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(150, 100, generator=g)).Q
    a = (q1 * (0.7 ** torch.arange(100.0))) @ q2.T  # singular values 0.7^j
    _, s_exact, _ = top_singular(a, 8)
    u, s, vh = top_singular(a, 8, lowrank=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s, s_exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(u.T @ u, torch.eye(8), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.T, torch.eye(8), rtol=0, atol=1e-5)


def test_polar_factor_is_nearest_orthonormal():
    # [[3, 0], [4, 5]]: polar factor by hand from A (A^T A)^(-1/2), A^T A = [[25, 20], [20, 25]]
    # eigenvalues 45 and 5 on (1, 1)/sqrt2 and (1, -1)/sqrt2.
    a = torch.tensor([[3.0, 0.0], [4.0, 5.0]])
    v = np.array([[1, 1], [1, -1]]) / np.sqrt(2)
    inv_sqrt = v @ np.diag([45**-0.5, 5**-0.5]) @ v.T
    expected = torch.tensor(a.double().numpy() @ inv_sqrt, dtype=torch.float32)
    torch.testing.assert_close(polar(a), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"svd": "randomized"}, "params.svd: expected one of ['full', 'lowrank', 'none']"),
        ({"svd": [1.0, 2.0]}, "params.svd: a list value is not allowed"),
        ({"lambda": "high"}, "params.lambda: expected a number"),
        ({"density": 0.2}, "params.density: unknown parameter for 'tsv_m'"),
    ],
)
def test_recipe_errors_name_the_field(params, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe({"method": "tsv_m", "base": "b", "models": [{"uri": "m0"}], "params": params})


def test_needs_a_base():
    with pytest.raises(RecipeError, match="base: method 'tsv_m' needs a base model"):
        parse_recipe({"method": "tsv_m", "models": [{"uri": "m0"}, {"uri": "m1"}]})
