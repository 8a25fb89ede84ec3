"""R-TSVM against a naive numpy formulation (entry loops, full SVDs, whitening), its reduction
to TSV-M, determinism and recipe checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amalgam.errors import RecipeError
from amalgam.methods.r_tsvm import adaptive_ranks, energy_rank, outlier_weighted
from amalgam.recipe import parse_recipe

from .naive_subspace import inverse_sqrt


def heavy_tailed(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """A rank-``rank`` matrix plus a few large entries (outliers)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank
    spikes = torch.zeros(m * n)
    spikes[torch.randperm(m * n, generator=g)[:3]] = 25.0
    return low + spikes.reshape(m, n)


def naive_weighted(delta: np.ndarray, c: float) -> np.ndarray:
    """Entry by entry: weight min(1, c s / |x|), s = 1.4826 x the lower median of the non-zero
    magnitudes (found by a full sort); c = 0 leaves it as it is."""
    if c == 0:
        return delta.copy()
    mags = sorted(abs(float(x)) for x in delta.reshape(-1) if x != 0)
    s = 1.4826 * mags[(len(mags) - 1) // 2]
    out = delta.copy()
    for idx, x in np.ndenumerate(delta):
        if x != 0:
            out[idx] = x * min(1.0, c * s / abs(x))
    return out


def naive_energy_rank(delta: np.ndarray, energy: float) -> int:
    s = np.linalg.svd(delta, compute_uv=False)
    total, running = float((delta**2).sum()), 0.0
    for k, value in enumerate(s, 1):
        running += value**2
        if running >= energy * total:
            return k
    return len(s)


def naive_r_tsvm(deltas: list[np.ndarray], lam: float, c: float, energy: float) -> np.ndarray:
    """Reweight each task vector, give each its energy rank (scaled down to share r when
    they do not fit), whiten the stacked singular vectors, sum."""
    weighted = [naive_weighted(d, c) for d in deltas]
    r = min(deltas[0].shape)
    ranks = [naive_energy_rank(d, energy) for d in weighted]
    if sum(ranks) > r:
        ranks = [int(np.floor(r * e / sum(ranks))) for e in ranks]
    us, sigmas, vts = [], [], []
    for d, k in zip(weighted, ranks, strict=True):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        us += [u[:, j] for j in range(k)]
        sigmas += [s[j] for j in range(k)]
        vts += [vt[j] for j in range(k)]
    u_hat, vt_hat = np.stack(us, axis=1), np.stack(vts, axis=0)
    u_orth = u_hat @ inverse_sqrt(u_hat.T @ u_hat)
    vt_orth = inverse_sqrt(vt_hat @ vt_hat.T) @ vt_hat
    return lam * (u_orth @ np.diag(sigmas) @ vt_orth)


def test_outlier_weights_against_an_entry_loop() -> None:
    delta = heavy_tailed(7, 9, 2, seed=0)
    delta[0, :4] = 0.0  # zeros do not count towards the median
    got = outlier_weighted(delta, 2.5)
    want = naive_weighted(delta.double().numpy(), 2.5)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-7)
    assert float(got.abs().max()) < 25.0  # the spikes were shrunk
    assert torch.equal(outlier_weighted(delta, 0.0), delta)  # 0: off


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_rank_against_a_running_sum(energy: float) -> None:
    for seed, rank in [(1, 1), (2, 3), (3, 6)]:
        delta = heavy_tailed(8, 10, rank, seed)
        s = torch.linalg.svdvals(delta)
        got = energy_rank(s, float(delta.double().pow(2).sum()), energy)
        assert got == naive_energy_rank(delta.double().numpy(), energy)
    assert energy_rank(torch.zeros(4), 0.0, 0.9) == 0


def test_adaptive_ranks_by_hand() -> None:
    assert adaptive_ranks([2, 3, 1], 8) == [2, 3, 1]  # they fit: each keeps its own
    assert adaptive_ranks([6, 3, 3], 8) == [4, 2, 2]  # 8 shared 6:3:3, floored
    assert adaptive_ranks([7, 1, 0], 4) == [3, 0, 0]


@pytest.mark.parametrize(("c", "energy"), [(3.0, 0.9), (2.0, 0.6), (0.0, 0.95)])
def test_matrix_merge_against_the_naive_formulation(merge, c: float, energy: float) -> None:
    base = torch.linspace(-1, 1, 12 * 10).reshape(12, 10)
    deltas = [heavy_tailed(12, 10, k, seed) for seed, k in [(4, 1), (5, 3), (6, 8)]]
    weights = [1.0, 0.5, 2.0]
    got = merge(
        "r_tsvm", base, [base + d for d in deltas],
        params={"lambda": 0.7, "outlier": c, "energy": energy},
        models=[{"weight": w} for w in weights],
    )  # fmt: skip
    scaled = [w * d.double().numpy() for d, w in zip(deltas, weights, strict=True)]
    want = base.double().numpy() + naive_r_tsvm(scaled, 0.7, c, energy)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-4)


def test_without_reweighting_at_fixed_rank_it_is_tsv_m(merge) -> None:
    base = torch.linspace(-1, 1, 12 * 10).reshape(12, 10)
    inputs = [base + heavy_tailed(12, 10, k, seed) for seed, k in [(7, 2), (8, 4), (9, 9)]]
    plain = {"outlier": 0.0, "rank": "fixed", "lambda": 0.8}
    got = merge("r_tsvm", base, inputs, params=plain)
    assert torch.equal(got, merge("tsv_m", base, inputs, params={"lambda": 0.8}))
    vec = torch.tensor([1.0, -2.0, 0.5])
    vectors = [vec + torch.tensor([0.5, 1.0, -1.0]), vec + torch.tensor([1.5, 0.0, 2.0])]
    torch.testing.assert_close(
        merge("r_tsvm", vec, vectors, params=plain),
        merge("tsv_m", vec, vectors, params={"lambda": 0.8}),
    )
    default = merge("r_tsvm", base, inputs)  # the defaults do change the merge here
    assert not torch.allclose(default, merge("tsv_m", base, inputs), atol=1e-3)


def test_deterministic_whatever_the_seed(merge) -> None:
    base = torch.zeros(9, 11)
    inputs = [heavy_tailed(9, 11, k, seed) for seed, k in [(10, 2), (11, 5)]]
    runs = [merge("r_tsvm", base, inputs, seed=seed) for seed in (0, 0, 7)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rank": "half"}, "params.rank: expected one of"),
        ({"energy": 0.0}, "params.energy: must be in"),
        ({"outlier": -1.0}, "params.outlier: must be in"),
        ({"svd": "lowrank"}, "params.svd: expected one of"),
    ],
)
def test_recipe_checks(params: dict, message: str) -> None:
    data = {"method": "r_tsvm", "base": "b", "models": [{"uri": "a"}], "params": params}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)
