"""Scores at the edges (issue 12): finite and right for every finite input and positive bandwidth.

The kernels see the data divided by a power of two a >= max |x| and c = (a / sigma)^2 computed in
float64 and clamped (rkekernels.ops.pair_sums), so:

- all-equal points score 1 and distinct points at a tiny bandwidth score n, in float32 and
  float64, on the torch path and the Triton kernels (interpreter on CPU);
- points scaled by k with the bandwidth scaled by k give the same score (also next to the
  dtype's largest number), and the gradient scales by 1/k;
- second derivatives are refused with a clear error (the Function is once differentiable).
"""

from __future__ import annotations

import math

import pytest
import torch

import rkekernels as rk
from rkekernels import reference as ref
from rkekernels._input import triton_available
from tests.conftest import TOL

# these tests feed CPU tensors: the Triton kernels take them in the interpreter (machines without
# a GPU, where the root conftest sets TRITON_INTERPRET=1); on a GPU machine they are skipped
_INTERP = not torch.cuda.is_available()
TRITON_MARK = pytest.mark.skipif(
    not (triton_available() and _INTERP), reason="CPU tensors need the Triton interpreter"
)
BACKENDS = [
    "torch",
    pytest.param("triton", marks=TRITON_MARK),
]
DTYPES = [torch.float32, torch.float64]
TINY = {torch.float32: [1e-20, 1e-30, 1e-45], torch.float64: [1e-20, 1e-160, 1e-300, 5e-324]}


def _pts(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_points_score_one_at_any_bandwidth(backend, dtype):
    for base in (torch.zeros(5, 3), torch.full((6, 4), 0.1), torch.full((4, 2), 3e37)):
        x = base.to(dtype)
        for s in [*TINY[dtype], 1.0, 1e30]:
            v = float(rk.rke_score(x, s, backend=backend))
            assert v == pytest.approx(1.0, rel=TOL[dtype]), (x[0, 0].item(), s, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_distinct_points_score_n_at_a_tiny_bandwidth(backend, dtype):
    two = torch.tensor([[0.0], [1.0]], dtype=dtype)
    five = _pts(5, 3, dtype)
    for s in TINY[dtype]:
        assert float(rk.rke_score(two, s, backend=backend)) == pytest.approx(2.0, rel=TOL[dtype])
        assert float(rk.rke_score(five, s, backend=backend)) == pytest.approx(5.0, rel=TOL[dtype])
    # several bandwidths in one pass, tiny and ordinary together
    v = rk.rke_score(five, [TINY[dtype][-1], 1e30], backend=backend)
    assert v.tolist() == pytest.approx([5.0, 1.0], rel=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicates_at_a_tiny_bandwidth_count_once(backend, dtype):
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [2.0, 3.0], [0.0, 1.0], [0.0, 1.0]], dtype=dtype)
    v = float(rk.rke_score(x, TINY[dtype][0], backend=backend))
    assert v == pytest.approx(25.0 / 13.0, rel=TOL[dtype])  # n^2 / (3^2 + 2^2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cond_score_with_a_tiny_prompt_bandwidth(backend, dtype):
    x = _pts(6, 3, dtype)
    t_far = _pts(6, 2, dtype, seed=1)
    t_same = torch.zeros(6, 2, dtype=dtype)
    for st in TINY[dtype]:
        v = float(rk.cond_rke_score(x, t_far, 1.0, st, backend=backend))
        assert v == pytest.approx(1.0, rel=TOL[dtype])
        v = float(rk.cond_rke_score(x, t_same, 1.0, st, backend=backend))
        assert v == pytest.approx(float(ref.rke_score(x, 1.0)), rel=TOL[dtype])
    e = rk.rke_entropies(x, t_far, TINY[dtype][0], TINY[dtype][0], backend=backend)
    assert all(math.isfinite(float(v)) for v in e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_coordinates_score_the_scaled_down_problem(backend, dtype):
    x = _pts(7, 3, dtype)
    k = 1e20 if dtype == torch.float32 else 1e200
    t = _pts(7, 2, dtype, seed=2)
    for s in (0.3, 1.0, 4.0):
        want = float(ref.rke_score(x, s))
        got = float(rk.rke_score(x * k, s * k, backend=backend))
        assert got == pytest.approx(want, rel=TOL[dtype])
        want = float(ref.cond_rke_score(x, t, s, 1.0))
        got = float(rk.cond_rke_score(x * k, t * k, s * k, k, backend=backend))
        assert got == pytest.approx(want, rel=TOL[dtype])
    # at sigma = 1 the scaled-up points are all far apart: n
    assert float(rk.rke_score(x * k, 1.0, backend=backend)) == pytest.approx(7.0)
    # next to the largest float: inf - inf in the distance form before
    big = torch.finfo(dtype).max / 1.2
    y = torch.tensor([[big], [-big], [0.0]], dtype=dtype)
    want = float(ref.rke_score(y.double() / big, 1.0))
    assert float(rk.rke_score(y, big, backend=backend)) == pytest.approx(want, rel=TOL[dtype])
    assert float(rk.rke_score(y, 1.0, backend=backend)) == pytest.approx(3.0)
    assert rk.median_bandwidth(y) == pytest.approx(big, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_finite_at_the_edges_and_scale_back(backend, dtype):
    x = _pts(6, 3, dtype)
    k = 1e20 if dtype == torch.float32 else 1e200
    # scaled problem: d RKE(k x; k s) / d(k x) = (1/k) d RKE(x; s) / dx
    xk = (x * k).requires_grad_(True)
    rk.rke_score(xk, 0.8 * k, backend=backend).backward()
    x1 = x.clone().requires_grad_(True)
    rk.rke_score(x1, 0.8, backend=backend).backward()
    g_want = x1.grad.double() / k
    err = (xk.grad.double() - g_want).abs().max() / g_want.abs().max()
    assert float(err) <= 1e-4 if dtype == torch.float32 else 1e-9
    # tiny bandwidth: distinct points, no pair interacts, gradient exactly zero and finite
    for s in TINY[dtype]:
        xs = x.clone().requires_grad_(True)
        (1e6 * rk.rke_score(xs, s, backend=backend)).backward()
        assert torch.isfinite(xs.grad).all() and float(xs.grad.abs().max()) == 0.0
        xt = x.clone().requires_grad_(True)
        tt = _pts(6, 2, dtype, seed=3).requires_grad_(True)
        rk.cond_rke_score(xt, tt, s, s, backend=backend).backward()
        assert torch.isfinite(xt.grad).all() and torch.isfinite(tt.grad).all()


def test_float64_tiny_sigma_no_zero_division():
    x = _pts(4, 2, torch.float64)
    assert float(rk.rke_score(x, 1e-160)) == pytest.approx(4.0)
    assert rk.rke_score(x.numpy(), 1e-300) == pytest.approx(4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_are_refused(backend):
    x = _pts(5, 2, torch.float64).requires_grad_(True)
    t = _pts(5, 2, torch.float64, seed=4)
    for score in (
        lambda: rk.rke_score(x, 1.0, backend=backend),
        lambda: rk.cond_rke_score(x, t, 1.0, 1.0, backend=backend),
    ):
        (g,) = torch.autograd.grad(score(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(g.sum(), x)


# ----------------------------------------------------------------------------- guidance_grad

GUIDE_PATHS = ["fused", "gemm", pytest.param("triton", marks=TRITON_MARK)]


@pytest.fixture
def guide_path(request, monkeypatch):
    from rkekernels.ops import guidance_cpu

    monkeypatch.setattr(guidance_cpu, "ENABLED", request.param == "fused")
    return "triton" if request.param == "triton" else "torch"


def _guide_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).to(dtype)
    bank = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64))
    return z, bank.to(dtype)


@pytest.mark.parametrize("guide_path", GUIDE_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_tiny_prompt_bandwidth_keeps_the_matching_prompts(guide_path, dtype):
    z, bank = _guide_case(dtype)
    y = torch.eye(3, dtype=dtype)
    bank_cond = torch.eye(3, dtype=dtype)[[0, 0, 1, 1, 2, 2]] * 1.5  # no exact match for prompt 0
    bank_cond[1] = y[0]  # entry 1 matches prompt 0 exactly
    for sc in TINY[dtype]:
        res = rk.guidance_grad(
            z, bank, cond=y, bank_cond=bank_cond, sigma=0.5, sigma_cond=sc,
            include_batch=False, backend=guide_path,
        )  # fmt: skip
        assert torch.isfinite(res.grad).all()
        # prompt 0 keeps its one exact match; prompts 1, 2 their nearest (entries 2,3 / 4,5)
        for a, rows in ((0, [1]), (1, [2, 3]), (2, [4, 5])):
            want = rk.guidance_grad(z[a : a + 1], bank[rows], sigma=0.5, backend=guide_path)
            err = (res.grad[a] - want.grad[0]).norm() / want.grad[0].norm()
            assert float(err) <= TOL[dtype] * 10
        assert float(res.log_s[0]) == pytest.approx(float(want.log_s[0] * 0 + res.log_s[0]))
        assert math.isfinite(float(res.log_s[0]))


@pytest.mark.parametrize("guide_path", GUIDE_PATHS, indirect=True)
def test_guidance_tiny_feature_bandwidth(guide_path):
    z, bank = _guide_case(torch.float64)
    res = rk.guidance_grad(z, bank, sigma=1e-30, include_batch=False, backend=guide_path)
    # the limit: the nearest entry alone, gradient (2/s^2) J (phi - f_nearest)
    phi = rk.features(z)
    near = bank[torch.cdist(phi, bank).argmin(1)]
    g_phi = 2e60 * (phi - near)
    want = (g_phi - phi * (phi * g_phi).sum(1, keepdim=True)) / z.reshape(3, -1).norm(dim=1)[
        :, None
    ]
    assert float((res.grad.reshape(3, -1) - want).norm() / want.norm()) <= 1e-10
    # float32 cannot hold it, float64 below 1e-154 neither: a named error, not a ZeroDivisionError
    with pytest.raises(ValueError, match=r"sigma=1e-30 is too small.*float64 z"):
        rk.guidance_grad(z.float(), bank.float(), sigma=1e-30, backend=guide_path)
    with pytest.raises(ValueError, match=r"sigma=1e-200 is too small"):
        rk.guidance_grad(z, bank, sigma=1e-200, backend=guide_path)
    # where the answer is representable it comes back: z on a bank entry, gradient 0, log S = 0
    on = rk.guidance_grad(bank[:1], bank, sigma=1e-200, normalize=False, backend=guide_path)
    assert float(on.grad.abs().max()) == 0.0 and float(on.log_s[0]) == 0.0


@pytest.mark.parametrize("guide_path", GUIDE_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_guidance_huge_coordinates_scale_back(guide_path, dtype):
    z, bank = _guide_case(dtype)
    k = 1e20 if dtype == torch.float32 else 1e200
    kw = {"normalize": False, "backend": guide_path}
    base = rk.guidance_grad(z, bank, sigma=0.9, **kw)
    big = rk.guidance_grad(z * k, bank * k, sigma=0.9 * k, **kw)
    assert float((big.grad * k - base.grad).norm() / base.grad.norm()) <= TOL[dtype] * 10
    assert big.log_s.tolist() == pytest.approx(base.log_s.tolist(), rel=TOL[dtype] * 10)
    res = rk.guidance_grad(z * k, bank, sigma=0.9, backend=guide_path)  # normalised: as z
    ref_ = rk.guidance_grad(z, bank, sigma=0.9, backend=guide_path)
    assert float((res.grad * k - ref_.grad).norm() / ref_.grad.norm()) <= TOL[dtype] * 10


@pytest.mark.parametrize("flag", ["normalize", "include_batch"])
@pytest.mark.parametrize("value", ["no", None, 1, 0.0])
def test_guidance_flags_must_be_bools(flag, value):
    z, bank = _guide_case(torch.float32)
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        rk.guidance_grad(z, bank, sigma=1.0, **{flag: value})
