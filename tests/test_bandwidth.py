"""default_bandwidth (issue 22): the median distance / 2.5, independent of the row order, never 0
on duplicates, separating classes at a SHARED sigma, and warning where distances concentrate."""

import warnings

import numpy as np
import pytest
import torch

import rkekernels as rk


def _mixture(k, d, per, sep=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = sep * rng.normal(size=(k, d))
    x = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    return x, np.repeat(np.arange(k), per)


def _warnings_of(x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = rk.default_bandwidth(x)
    return s, [str(w.message) for w in caught]


def test_rule_is_the_median_distance_over_two_and_a_half():
    x, _ = _mixture(3, 5, 30)
    assert rk.default_bandwidth(x) == pytest.approx(rk.median_bandwidth(x) / 2.5, rel=1e-12)


@pytest.mark.parametrize("n", [300, 2500])  # all rows, and a 1,000-row subsample
def test_a_permutation_gives_the_same_sigma(n):
    x = np.random.default_rng(0).normal(size=(n, 6)) * np.arange(1, 7)
    s = rk.default_bandwidth(x)
    perm = np.random.default_rng(1).permutation(n)
    assert rk.default_bandwidth(x[perm]) == s
    assert rk.default_bandwidth(x[::-1].copy()) == s
    assert rk.default_bandwidth(torch.from_numpy(x[perm])) == s


def test_duplicates_never_give_zero():
    one = np.tile([[1.0, 2.0, 3.0]], (50, 1))
    assert rk.default_bandwidth(one) == 1.0  # all equal: every sigma gives RKE 1
    # a collapsed generator: one row 90% of the time, three others now and then
    rows = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 5.0]])
    x = rows[np.repeat([0, 1, 2, 3], [90, 4, 3, 3])]
    s = rk.default_bandwidth(x)
    assert np.isfinite(s) and s > 0
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(len(x), 1)]
    assert s == pytest.approx(np.median(d[d > 0]) / 2.5)
    # few distinct rows repeated, equally often: the median is already a distinct distance
    x = rows[np.repeat(np.arange(4), 25)]
    assert rk.default_bandwidth(x) == pytest.approx(5.0 / 2.5)


def test_a_shared_sigma_separates_a_mixture_from_one_cluster():
    x, y = _mixture(10, 16, 100)
    mix = x[np.random.default_rng(1).choice(len(x), 100, replace=False)]
    s = rk.default_bandwidth(mix)
    ones = [rk.rke_score(x[y == c], s) for c in range(10)]
    assert rk.rke_score(mix, s) >= 3.0 * np.median(ones)


def test_a_shared_sigma_separates_ten_digits_from_one():
    """The issue's case: digits pixels, n = 170 (the previous default gave 1.18x)."""
    datasets = pytest.importorskip("sklearn.datasets")
    b = datasets.load_digits()
    x, y = b.data.astype(np.float64), b.target
    rng = np.random.default_rng(1)
    ten = x[rng.choice(len(x), 170, replace=False)]
    s = rk.default_bandwidth(ten)
    ones = [
        rk.rke_score(x[y == c][rng.choice((y == c).sum(), 170, replace=False)], s)
        for c in range(10)
    ]
    assert rk.rke_score(ten, s) >= 3.0 * np.median(ones)


def test_warns_where_distances_concentrate_and_not_on_structure():
    noise = np.random.default_rng(0).uniform(size=(300, 64))  # high-dimensional noise
    s, msgs = _warnings_of(noise)
    assert s > 0 and len(msgs) == 1
    assert "rke_sweep" in msgs[0] and "rkekernels compare --sweep" in msgs[0]
    x, _ = _mixture(5, 64, 60)  # the same dimension, with groups
    assert _warnings_of(x)[1] == []
    assert _warnings_of(np.random.default_rng(0).normal(size=(300, 2)))[1] == []  # low-d blob
    assert _warnings_of(noise[:19])[1] == []  # too few rows to tell
