"""rkekernels.evaluation against the float64 reference, and the intervals' coverage."""

import math

import numpy as np
import pytest
import torch

from rkekernels import evaluation as ev
from rkekernels import reference as ref
from rkekernels import rke_score
from rkekernels.ops import scores_torch


def _data(n=40, d=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sample_sums_match_the_reference(dtype, tol):
    x, t = _data(dtype=dtype)
    got = ev.sample_sums(x, t, sigma=[0.7, 2.0], sigma_t=1.3)
    for k, s in enumerate([0.7, 2.0]):
        want = ref.sample_sums(x, t, s, 1.3)
        torch.testing.assert_close(got.x[k], want[0], rtol=tol, atol=0)
        torch.testing.assert_close(got.xt[k], want[2], rtol=tol, atol=0)
    torch.testing.assert_close(got.t, ref.sample_sums(x, t, 1.0, 1.3)[1], rtol=tol, atol=0)
    # summed over i they give the RKE denominator
    one = ev.sample_sums(x.numpy(), sigma=0.7)
    assert isinstance(one.x, np.ndarray) and one.t is None
    assert math.isclose(x.shape[0] ** 2 / one.x.sum(), float(rke_score(x, 0.7)), rel_tol=tol)


def test_row_sums_stream_over_many_tiles():
    x, t = _data(n=37)
    xc, tc = x - x.mean(0), t - t.mean(0)
    sx, st, sxt = scores_torch.row_sums(xc, tc, [1.0], 1.0, block_rows=7, block_cols=5)
    want = ref.sample_sums(x, t, 1.0, 1.0)
    for a, b in zip((sx[0], st, sxt[0]), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("unbiased", [False, True])
def test_intervals_equal_the_brute_force_jackknife(unbiased):
    x, t = _data(n=25, seed=1)
    ci = ev.rke_interval(x, sigma=1.1, unbiased=unbiased)
    log_est, se = ref.rke_jackknife(x, 1.1, unbiased)
    assert math.isclose(math.log(ci.estimate), log_est, rel_tol=1e-10)
    assert math.isclose(ci.se_log, se, rel_tol=1e-8)
    z = 1.959963984540054
    assert math.isclose(ci.low, math.exp(log_est - z * se), rel_tol=1e-8)
    assert math.isclose(ci.high, math.exp(log_est + z * se), rel_tol=1e-8)
    cc = ev.cond_rke_interval(x, t, sigma=1.1, sigma_t=0.8, unbiased=unbiased)
    log_est, se = ref.cond_rke_jackknife(x, t, 1.1, 0.8, unbiased)
    assert math.isclose(math.log(cc.estimate), log_est, rel_tol=1e-10)
    assert math.isclose(cc.se_log, se, rel_tol=1e-8)
    many = ev.rke_interval(x, sigma=[1.1, 3.0], level=0.9, unbiased=unbiased)
    assert many.estimate.shape == (2,) and many.level == 0.9
    assert math.isclose(many.se_log[0], ci.se_log, rel_tol=1e-12)


@pytest.mark.slow
def test_coverage_by_simulation():
    """x ~ N(0, I_2), sigma = 1: population RKE = 1 / E k(x, x')^2 = (1 + 4/sigma^2)^(d/2) = 5.

    With t independent of x, the population conditional RKE is the same 5. 200 sets of n = 60
    (float32: the tiles are cheap; the sums are float64): the unbiased estimator's 95% intervals
    must cover 5 in 89% to 99% of them (the standard error of a coverage of 0.95 is 0.015).
    """
    truth = (1.0 + 4.0) ** (2 / 2)
    g = torch.Generator().manual_seed(0)
    reps, n = 200, 60
    hits = {"u": 0, "v": 0, "cond_u": 0}
    for _ in range(reps):
        x = torch.randn(n, 2, generator=g)
        t = torch.randn(n, 1, generator=g)
        u = ev.rke_interval(x, sigma=1.0, unbiased=True)
        v = ev.rke_interval(x, sigma=1.0)
        c = ev.cond_rke_interval(x, t, sigma=1.0, sigma_t=1.0, unbiased=True)
        hits["u"] += u.low <= truth <= u.high
        hits["v"] += v.low <= truth <= v.high
        hits["cond_u"] += c.low <= truth <= c.high
    cover = {k: h / reps for k, h in hits.items()}
    print("coverage of the 95% intervals:", cover)
    assert 0.89 <= cover["u"] <= 0.99, cover
    assert 0.89 <= cover["cond_u"] <= 0.99, cover
    # the plug-in estimator counts the diagonal (k = 1): biased low, it covers less often
    assert cover["v"] < cover["u"], cover


def test_relative_rke_matches_the_reference_and_streams(monkeypatch):
    x, _ = _data(n=23, seed=2)
    y, _ = _data(n=17, seed=3)
    y = y + 0.5
    monkeypatch.setattr(scores_torch, "BLOCK_ROWS", 4)
    monkeypatch.setattr(scores_torch, "BLOCK_COLS", 3)
    got = ev.relative_rke(x, y, sigma=[0.8, 2.5])
    assert isinstance(got, torch.Tensor) and got.shape == (2,)
    for k, s in enumerate([0.8, 2.5]):
        assert math.isclose(float(got[k]), float(ref.relative_rke(x, y, s)), rel_tol=1e-10)
    f32 = ev.relative_rke(x.float().numpy(), y.float().numpy(), sigma=0.8)
    assert isinstance(f32, float)
    assert math.isclose(f32, float(ref.relative_rke(x, y, 0.8)), rel_tol=1e-5)
    # same distribution: about RKE(x); far apart: much larger
    far = ev.relative_rke(x, y + 10.0, sigma=2.5)
    assert far > 100 * float(got[1])


def test_ken_matches_the_papers_fused_matrix_and_finds_the_new_mode():
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
    refset = centres[torch.arange(30) % 2] + 0.3 * torch.randn(
        30, 2, generator=g, dtype=torch.float64
    )
    gen = centres[torch.arange(24) % 3] + 0.3 * torch.randn(24, 2, generator=g, dtype=torch.float64)
    nov = ev.ken_novelty(gen, refset, sigma=1.0, top=3, per_mode=8)
    want_score, want_vals = ref.ken_novelty(gen, refset, 1.0)
    # D G is not normal: the ~4e-15 difference between GEMM-form and exact-difference kernel
    # values moves its eigenvalues by up to ~4e-8 (measured; both solvers agree to 2e-16 with a
    # 40-digit mpmath solve of their own matrix), hence 1e-6 and not 1e-10 here
    assert math.isclose(nov.score, want_score, rel_tol=1e-6)
    np.testing.assert_allclose(nov.eigenvalues, want_vals.numpy(), rtol=0, atol=1e-6)
    new = {i for i in range(24) if i % 3 == 2}  # the samples of the mode REF lacks
    assert set(nov.modes[0].members.tolist()) == new
    assert 0.2 < nov.modes[0].weight < 1 / 3  # a third of GEN, less its spread
    # GEN from REF's own two modes: only sampling noise is novel
    like = centres[torch.arange(24) % 2] + 0.3 * torch.randn(
        24, 2, generator=g, dtype=torch.float64
    )
    same = ev.ken_novelty(like, refset, sigma=1.0)
    print("KEN new mode / same modes:", nov.score, nov.novel_mass, same.score, same.novel_mass)
    assert same.score < nov.score
    assert nov.novel_mass > 1.8 * same.novel_mass  # 0.36 vs 0.17
    # random Fourier features (the route for large sets): close, and the same novel mode
    rff = ev.ken_novelty(gen, refset, sigma=1.0, top=1, per_mode=8, method="rff", dim=512)
    print("KEN exact / rff:", nov.score, rff.score, nov.novel_mass, rff.novel_mass)
    assert abs(rff.novel_mass - nov.novel_mass) < 0.1 * nov.novel_mass
    assert abs(rff.score - nov.score) < 0.25 * nov.score
    assert set(rff.modes[0].members.tolist()) == new


def test_bad_input_names_the_argument():
    x, t = _data(n=10)
    with pytest.raises(ValueError, match="level"):
        ev.rke_interval(x, 1.0, level=1.5)
    with pytest.raises(ValueError, match="n >= 3"):
        ev.rke_interval(x[:2], 1.0, unbiased=True)
    with pytest.raises(ValueError, match="same width"):
        ev.relative_rke(x, t, 1.0)
    with pytest.raises(ValueError, match="top"):
        ev.ken_novelty(x, x, 1.0, top=0)
    with pytest.raises(ValueError, match="t is None"):
        ev.cond_rke_interval(x, None)
    with pytest.raises(ValueError, match="underflows"):
        ev.rke_interval(x * 1e6, 1e-3, unbiased=True)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        ev.sample_sums(torch.full((3, 2), float("nan")))


def _u_jackknife(x, sigma, t=None, sigma_t=1.0):
    """Dense float64 (log U, jackknife se): off-diagonal sums with the diagonal masked out."""
    n = x.shape[0]
    k2 = ref.gaussian_kernel(x, x, sigma) ** 2
    kt2 = ref.gaussian_kernel(t, t, sigma_t) ** 2 if t is not None else None
    mask = ~torch.eye(n, dtype=torch.bool)

    def stat(idx):
        m = mask[idx][:, idx]
        if t is None:
            return math.log(len(idx) * (len(idx) - 1)) - torch.log(k2[idx][:, idx][m].sum())
        a, b = kt2[idx][:, idx][m].sum(), (k2 * kt2)[idx][:, idx][m].sum()
        return torch.log(a) - torch.log(b)

    idx = torch.arange(n)
    loo = torch.stack([stat(idx[idx != i]) for i in range(n)])
    return float(stat(idx)), float(((n - 1) / n * ((loo - loo.mean()) ** 2).sum()).sqrt())


@pytest.mark.parametrize("spacing", [5.8, 6.0, 7.0])
def test_unbiased_interval_keeps_a_tiny_off_diagonal_mass(spacing):
    """Issue 23 A.1: off = F - n lost the digits (6.0: 1.400e18 for 4.311e17; 7.0 raised)."""
    x = spacing * torch.arange(200, dtype=torch.float64)[:, None]
    ci = ev.rke_interval(x, sigma=1.0, unbiased=True)
    k2 = ref.gaussian_kernel(x, x, 1.0) ** 2
    want = 200 * 199 / k2[~torch.eye(200, dtype=torch.bool)].sum()
    # 1e-9: the tiles' GEMM distances (|x| ~ 600) carry ~1e-10 of the exponent
    assert math.isclose(ci.estimate, float(want), rel_tol=1e-9)
    t = torch.zeros(200, 1, dtype=torch.float64)  # Kt = 1: CondRKE = U-statistic of x
    cc = ev.cond_rke_interval(x, t, sigma=1.0, sigma_t=1.0, unbiased=True)
    assert math.isclose(cc.estimate, float(want), rel_tol=1e-9)


def test_unbiased_jackknife_recomputes_a_cancelled_leave_one_out_sum():
    """One close pair holds nearly all the mass: O - 2 r_0 cancels; it is summed again."""
    x = torch.cat([torch.tensor([0.0, 0.1]), 7.0 * torch.arange(1, 29)]).double()[:, None]
    ci = ev.rke_interval(x, sigma=1.0, unbiased=True)
    log_u, se = _u_jackknife(x, 1.0)
    assert math.isclose(math.log(ci.estimate), log_u, rel_tol=1e-10)
    assert math.isclose(ci.se_log, se, rel_tol=1e-8)
    t = torch.linspace(0, 1, 30, dtype=torch.float64)[:, None]
    cc = ev.cond_rke_interval(x, t, sigma=1.0, sigma_t=2.0, unbiased=True)
    log_c, se_c = _u_jackknife(x, 1.0, t, 2.0)
    assert math.isclose(math.log(cc.estimate), log_c, rel_tol=1e-10)
    assert math.isclose(cc.se_log, se_c, rel_tol=1e-8)


def test_unbiased_jackknife_without_off_diagonal_mass_raises():
    """Issue 23 A.1: a leave-one-out set with no off-diagonal mass gave se_log = 676.5 (a clamp)."""
    x = torch.tensor([[0.0], [1.0], [100.0], [200.0], [300.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"jackknife is undefined: without sample 0"):
        ev.rke_interval(x, sigma=1.0, unbiased=True)
    t = torch.zeros(5, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"jackknife is undefined: without sample 0"):
        ev.cond_rke_interval(x, t, sigma=1.0, sigma_t=1.0, unbiased=True)
