"""Hypothesis properties of SPEC section 2 on the streamed path (float64, exact)."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import rkekernels as rk
from rkekernels import reference as ref

sizes = st.tuples(st.integers(1, 40), st.integers(1, 6))
sigmas = st.floats(0.05, 50.0)
seeds = st.integers(0, 2**31 - 1)


def _x(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale


@given(sizes, sigmas, seeds)
def test_bounds_one_to_n(nd, s, seed):
    n, d = nd
    r = float(rk.rke_score(_x(n, d, seed), s))
    assert 1.0 - 1e-12 <= r <= n * (1.0 + 1e-12)


@given(sizes, sigmas, seeds)
def test_permutation_invariance(nd, s, seed):
    n, d = nd
    x = _x(n, d, seed)
    t = _x(n, 2, seed + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a = rk.rke_entropies(x, t, s, 1.0)
    b = rk.rke_entropies(x[perm], t[perm], s, 1.0)
    for u, v in zip(a, b):
        assert math.isclose(float(u), float(v), rel_tol=1e-10, abs_tol=1e-12)


@given(sizes, sigmas, seeds, st.integers(2, 4))
def test_replication_invariance(nd, s, seed, k):
    n, d = nd
    x = _x(n, d, seed)
    assert math.isclose(
        float(rk.rke_score(x.repeat(k, 1), s)), float(rk.rke_score(x, s)), rel_tol=1e-10
    )


@given(sizes, sigmas, seeds, st.floats(-1e3, 1e3))
def test_translation_invariance(nd, s, seed, shift):
    n, d = nd
    x = _x(n, d, seed)
    assert math.isclose(float(rk.rke_score(x + shift, s)), float(rk.rke_score(x, s)), rel_tol=1e-10)


@given(st.integers(1, 7), st.integers(1, 12), st.integers(1, 5), seeds)
def test_separated_tight_clusters_count_as_modes(m, per, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.arange(m, dtype=torch.float64)[:, None] * 100.0 * torch.ones(1, d)
    x = centres.repeat_interleave(per, 0) + 1e-3 * torch.randn(m * per, d, generator=g).double()
    assert math.isclose(float(rk.rke_score(x, 1.0)), m, rel_tol=1e-4)


@given(sizes, sigmas, seeds)
def test_conditional_limits(nd, s, seed):
    n, d = nd
    x = _x(n, d, seed)
    same = torch.zeros(n, 3, dtype=torch.float64)
    assert math.isclose(
        float(rk.cond_rke_score(x, same, s, 1.0)), float(rk.rke_score(x, s)), rel_tol=1e-10
    )
    far = torch.arange(n, dtype=torch.float64)[:, None] * 1e3 * torch.ones(1, 3)
    assert math.isclose(float(rk.cond_rke_score(x, far, s, 1.0)), 1.0, rel_tol=1e-10)


@given(sizes, sigmas, seeds)
def test_entropies_match_reference_and_the_scores(nd, s, seed):
    """The five entropies against the dense reference, and consistent with the two scores."""
    n, d = nd
    x, t = _x(n, d, seed), _x(n, 2, seed + 7)
    e = rk.rke_entropies(x, t, s, 0.7)
    for got, want in zip(e, ref.rke_entropies(x, t, s, 0.7)):
        assert math.isclose(float(got), float(want), rel_tol=1e-10, abs_tol=1e-10)
    assert math.isclose(float(e.h_x), math.log(float(rk.rke_score(x, s))), abs_tol=1e-10)
    assert math.isclose(
        float(e.h_x_given_t), math.log(float(rk.cond_rke_score(x, t, s, 0.7))), abs_tol=1e-10
    )


@given(sizes, sigmas, seeds)
def test_mutual_information_is_symmetric(nd, s, seed):
    """I2(X;T) = I2(T;X): the joint sum must not depend on which input is x."""
    n, d = nd
    x, t = _x(n, d, seed), _x(n, 2, seed + 7)
    a = rk.rke_entropies(x, t, s, 0.7)
    b = rk.rke_entropies(t, x, 0.7, s)
    assert math.isclose(float(a.mutual_info), float(b.mutual_info), abs_tol=1e-10)
    assert math.isclose(float(a.h_xt), float(b.h_xt), rel_tol=1e-10, abs_tol=1e-12)


@given(st.integers(2, 30), st.integers(1, 4), seeds)
def test_sigma_limits(n, d, seed):
    """RKE -> n as sigma -> 0 for distinct points, -> 1 as sigma -> infinity; finite for huge x."""
    x = _x(n, d, seed) * 1e6
    assert math.isclose(float(rk.rke_score(x, 1e-8)), n, rel_tol=1e-12)
    assert math.isclose(float(rk.rke_score(x.float(), 1e-8)), n, rel_tol=1e-6)
    assert math.isclose(float(rk.rke_score(x, 1e14)), 1.0, rel_tol=1e-6)
    assert math.isfinite(float(rk.rke_score(x.float(), 1e14)))
    assert math.isclose(float(rk.rke_score(x.float(), 1e12)), 1.0, rel_tol=1e-6)
    for s in (1.0, 1e6):  # in between: finite and within [1, n]
        v = float(rk.rke_score(x.float(), s))
        assert 1.0 - 1e-6 <= v <= n * (1 + 1e-6)
