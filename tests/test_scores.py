"""Forward values of the streamed torch path against the float64 dense reference (SPEC 5)."""

import itertools
from functools import cache

import numpy as np
import pytest
import torch

import rkekernels as rk
from rkekernels import reference as ref
from rkekernels.ops import scores_torch
from tests.conftest import rel

# (dtype, relative tolerance), fixed per dtype as SPEC section 5 says
DTYPE_TOL = [(torch.float64, 1e-10), (torch.float32, 1e-5)]
# 1025 rows: two row blocks of the default 1,024-row tiles, the last of one row; 2049: three.
# (The dense float64 reference costs n^2 d: d = 129 stays at n = 1025.)
SHAPES = [(1, 3), (2, 1), (37, 3), (37, 64), (1025, 129), (2049, 1)]


def _data(n, d, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * n + d)
    # three loose clusters so that scores are far from both 1 and n
    centres = 3.0 * torch.randn(3, d, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (n,), generator=g)
    return centres[lab] + torch.randn(n, d, generator=g, dtype=torch.float64) + 5.0


def _sigma(d):
    return 1.5 * (d**0.5)


@cache
def _ref(n, d):
    x = _data(n, d)
    t = _data(n, 2, seed=7)
    s, st = _sigma(d), 1.1
    return (
        float(ref.rke_score(x, s)),
        float(ref.cond_rke_score(x, t, s, st)),
        tuple(float(v) for v in ref.rke_entropies(x, t, s, st)),
    )


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("n,d", SHAPES)
def test_rke_score_matches_reference(n, d, dtype, tol):
    x = _data(n, d).to(dtype)
    assert rel(rk.rke_score(x, _sigma(d)), _ref(n, d)[0]) <= tol


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("n,d", [(1, 3), (37, 3), (1025, 129), (2049, 1)])
def test_cond_and_entropies_match_reference(n, d, dtype, tol):
    x, t = _data(n, d).to(dtype), _data(n, 2, seed=7).to(dtype)
    _, want_cond, want_ent = _ref(n, d)
    assert rel(rk.cond_rke_score(x, t, _sigma(d), 1.1), want_cond) <= tol
    got = rk.rke_entropies(x, t, _sigma(d), 1.1)
    for g, w in zip(got, want_ent):
        # entropies can be ~0 (n = 1): compare with an absolute floor of tol
        assert abs(float(g) - w) <= tol * max(1.0, abs(w))


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("rows,cols", [(16, 16), (16, 24), (7, 40), (64, 5)])
def test_tile_boundaries(monkeypatch, rows, cols, dtype, tol):
    """Tiny tiles: many partial tiles, diagonal tiles of odd size, last tiles of width 1."""
    monkeypatch.setattr(scores_torch, "BLOCK_ROWS", rows)
    monkeypatch.setattr(scores_torch, "BLOCK_COLS", cols)
    n, d = 101, 5
    x, t = _data(n, d).to(dtype), _data(n, 2, seed=7).to(dtype)
    s, st = _sigma(d), 1.1
    assert rel(rk.rke_score(x, s), float(ref.rke_score(x.double(), s))) <= tol
    want = [float(v) for v in ref.rke_entropies(x.double(), t.double(), s, st)]
    got = rk.rke_entropies(x, t, [s, 2 * s], st)
    for g, w in zip(got, want):
        assert abs(float(g[0]) - w) <= tol * max(1.0, abs(w))


def test_tiles_cover_upper_triangle_once():
    n = 23
    cover = torch.zeros(n, n)
    for i0, i1, j0, j1, diag in scores_torch.tiles(n, 5, 7):
        cover[i0:i1, j0:j1] += 1
        if not diag:  # an off-diagonal tile stands for itself and its mirror image
            assert j0 >= i1
            cover[j0:j1, i0:i1] += 1
    assert torch.equal(cover, torch.ones(n, n))  # every ordered pair exactly once
    shards = [list(scores_torch.tiles(n, 5, 7, shard=(r, 3))) for r in range(3)]
    assert sorted(itertools.chain(*shards)) == sorted(scores_torch.tiles(n, 5, 7))


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_several_sigmas_in_one_pass(dtype, tol):
    x = _data(300, 10).to(dtype)
    sig = [0.5, 2.0, 7.0, 40.0]
    got = rk.rke_score(x, sig)
    assert got.shape == (4,)
    for g, s in zip(got, sig):
        assert rel(g, float(ref.rke_score(x.double(), s))) <= tol
    npy = rk.rke_score(x.numpy(), sig)
    assert isinstance(npy, np.ndarray) and npy.shape == (4,)
    t = _data(300, 2, seed=3).to(dtype)
    got_c = rk.cond_rke_score(x, t, sig, 1.3)
    for g, s in zip(got_c, sig):
        assert rel(g, float(ref.cond_rke_score(x.double(), t.double(), s, 1.3))) <= tol


def test_float16_and_bfloat16_accumulate_in_float32():
    x = _data(200, 8)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt)
        got = rk.rke_score(xh, 4.0)
        assert got.dtype == torch.float32
        # exact w.r.t. the rounded input
        assert rel(got, float(ref.rke_score(xh.double(), 4.0))) <= 1e-5


def test_integer_input_is_float32():
    x = torch.arange(12).reshape(6, 2)
    got = rk.rke_score(x, 1.0)
    assert got.dtype == torch.float32
    assert rel(got, float(ref.rke_score(x.double(), 1.0))) <= 1e-6


def test_input_kinds_and_output_types():
    x = _data(50, 4)
    want = float(ref.rke_score(x, 3.0))
    out_t = rk.rke_score(x, 3.0)
    assert isinstance(out_t, torch.Tensor) and out_t.dim() == 0
    out_np = rk.rke_score(x.numpy(), 3.0)
    assert isinstance(out_np, float) and rel(out_np, want) <= 1e-10
    out_list = rk.rke_score(x.tolist(), 3.0)
    assert isinstance(out_list, float) and rel(out_list, want) <= 1e-10

    class DLPackOnly:  # an array from another framework, seen only through __dlpack__
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kw):
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    out_dl = rk.rke_score(DLPackOnly(x), 3.0)
    assert isinstance(out_dl, float) and rel(out_dl, want) <= 1e-10
    ent = rk.rke_entropies(x.numpy(), x[:, :2].numpy(), 3.0, 1.0)
    assert all(isinstance(v, float) for v in ent)


def test_median_bandwidth_matches_reference():
    x = _data(500, 6)
    assert abs(rk.median_bandwidth(x) - float(ref.median_bandwidth(x))) <= 1e-12
    # default sigma is default_bandwidth (no longer the median), for x and for t alike
    t = _data(500, 3, seed=5)
    sx, st = rk.default_bandwidth(x), rk.default_bandwidth(t)
    assert sx != rk.median_bandwidth(x)
    assert float(rk.rke_score(x)) == float(rk.rke_score(x, sx))
    assert float(rk.cond_rke_score(x, t)) == float(rk.cond_rke_score(x, t, sx, st))


def test_median_bandwidth_subsamples_large_sets_deterministically():
    x = _data(5000, 3)
    a, b = rk.median_bandwidth(x), rk.median_bandwidth(x.clone())
    assert a == b
    # a 1,000-row subsample of a homogeneous set is close to the full median
    full = float(ref.median_bandwidth(x[:2000]))
    assert abs(a - full) / full < 0.1


def test_median_bandwidth_degenerate_sets():
    assert rk.median_bandwidth(torch.zeros(1, 4)) == 1.0
    assert rk.median_bandwidth(torch.zeros(5, 4)) == 1.0
    x = torch.zeros(10, 1)
    x[0] = 2.0  # most pairs coincide: mean positive distance
    assert rk.median_bandwidth(x) == pytest.approx(2.0)


def test_vendi_score_of_order_two_is_rke():
    """Peer check: vendi-score's order-q Vendi score, q = 2, on the same Gaussian kernel."""
    vendi = pytest.importorskip("vendi_score.vendi")
    x = _data(120, 5)
    s = 2.5
    K = ref.gaussian_kernel(x, x, s).numpy()
    v2 = vendi.score_K(K, q=2)
    assert abs(float(rk.rke_score(x, s)) - v2) / v2 <= 1e-10
    assert abs(float(rk.rke_score(x.float(), s)) - v2) / v2 <= 1e-5


def test_no_n_by_n_allocation(monkeypatch):
    """The streamed path never builds an n x n matrix: cap tensor sizes while it runs."""
    monkeypatch.setattr(scores_torch, "BLOCK_ROWS", 64)
    monkeypatch.setattr(scores_torch, "BLOCK_COLS", 64)
    n = 300  # 5 x 5 blocks: an n x n temporary (90,000) would be 22 times the cap
    x = torch.randn(n, 4, requires_grad=True)
    t = torch.randn(n, 2)
    seen = []
    orig = torch.Tensor.exp_

    def spy(self):
        seen.append(self.numel())
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "exp_", spy)
    rk.cond_rke_score(x, t, 1.0, 1.0).backward()
    assert seen and max(seen) <= 64 * 64


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_half_octave_sigmas_squared_tiles_match_the_reference(dtype, tol):
    """Per-sample sums over a half-octave grid (tiles squared, `scores_torch.power_plan`), with
    t, at SPEC's accuracy against the float64 reference; far pairs (exp underflow: the floored
    exp) included."""
    from rkekernels.ops import scores_torch

    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(40, 5, generator=gen), 12.0 + torch.randn(9, 5, generator=gen)])
    t = torch.randn(49, 3, generator=gen)
    grid = [0.9 * 2.0 ** (k / 2.0) for k in range(-4, 5)] + [0.9]  # one repeated
    ops = [op for _, op in scores_torch.power_plan([1.0 / s**2 for s in grid])]
    assert ops.count("square") >= 5 and ops.count("same") == 1
    xc, tc = x.to(dtype), t.to(dtype)
    xc, tc = xc - xc.mean(0), tc - tc.mean(0)
    got = scores_torch.row_sums(xc, tc, [1.0 / s**2 for s in grid], 1.0, block_rows=16)
    for k, s in enumerate(grid):
        want_x, _, want_xt = ref.sample_sums(x, t, s, 1.0)
        torch.testing.assert_close(got[0][k], want_x, rtol=tol, atol=0.0)
        torch.testing.assert_close(got[2][k], want_xt, rtol=tol, atol=0.0)


def test_floored_exp_keeps_underflow_exact_zero():
    from rkekernels.ops.scores_torch import floored_exp_

    for dtype in (torch.float32, torch.float64):
        v = torch.tensor([0.0, -1.0, -60.0, -90.0, -800.0], dtype=dtype)
        got = floored_exp_(v.clone())
        assert got[0] == 1.0 and got[-1] == 0.0
        want = torch.exp(v)
        torch.testing.assert_close(got[:3], want[:3], rtol=1e-6, atol=0.0)
        assert abs(float(got[3]) - float(want[3])) <= 2e-38
