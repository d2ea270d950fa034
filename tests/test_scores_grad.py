"""Gradients of the streamed scores: gradcheck, random cotangents, incoming gradient != 1."""

import pytest
import torch

import rkekernels as rk
from rkekernels import reference as ref
from rkekernels.ops import scores_torch


def _xt(n, d, m, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 + 3.0
    t = torch.randn(n, m, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # several tiles, odd sizes, so the streamed backward crosses tile boundaries
    monkeypatch.setattr(scores_torch, "BLOCK_ROWS", 8)
    monkeypatch.setattr(scores_torch, "BLOCK_COLS", 11)


def test_gradcheck_float64():
    x, t = _xt(19, 3, 2)
    assert torch.autograd.gradcheck(lambda a: rk.rke_score(a, 1.7), (x,))
    assert torch.autograd.gradcheck(lambda a, b: rk.cond_rke_score(a, b, 1.7, 0.9), (x, t))
    assert torch.autograd.gradcheck(
        lambda a, b: torch.stack(list(rk.rke_entropies(a, b, [1.0, 3.0], 0.9))), (x, t)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_random_cotangents_through_every_output(dtype, tol):
    """A random linear functional of all outputs, all bandwidths: grads of x and t."""
    x, t = _xt(61, 5, 3, dtype)
    sig, st = [0.8, 2.0, 6.0], 1.3
    g = torch.Generator().manual_seed(1)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    ent = rk.rke_entropies(x, t, sig, st)
    loss = sum((e.double() * vi).sum() for e, vi in zip(ent, v))
    loss = loss + (rk.rke_score(x, sig).double() * w[0]).sum()
    loss = loss + (rk.cond_rke_score(x, t, sig, st).double() * w[1]).sum()
    gx, gt = torch.autograd.grad(loss, (x, t))

    xr, tr = x.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    lr = 0.0
    for k, s in enumerate(sig):
        er = ref.rke_entropies(xr, tr, s, st)
        lr = lr + sum(e * vi[k] for e, vi in zip(er, v))
        lr = lr + ref.rke_score(xr, s) * w[0, k] + ref.cond_rke_score(xr, tr, s, st) * w[1, k]
    rx, rt = torch.autograd.grad(lr, (xr, tr))
    assert gx.dtype == dtype and gt.dtype == dtype
    assert (gx.double() - rx).norm() <= tol * rx.norm()
    assert (gt.double() - rt).norm() <= tol * rt.norm()


def test_not_the_last_op():
    """The incoming gradient is not 1: the score feeds a further computation."""
    x, _ = _xt(40, 4, 1)
    y = (rk.rke_score(x * 1.5, 2.0) ** 2).log() * 3.0
    (gx,) = torch.autograd.grad(y, x)
    xr = x.detach().clone().requires_grad_()
    yr = (ref.rke_score(xr * 1.5, 2.0) ** 2).log() * 3.0
    (rx,) = torch.autograd.grad(yr, xr)
    assert (gx - rx).norm() <= 1e-10 * rx.norm()


def test_grad_only_for_inputs_that_need_it():
    x, t = _xt(30, 3, 2)
    t = t.detach()
    (gx,) = torch.autograd.grad(rk.cond_rke_score(x, t, 1.0, 1.0), (x,))
    assert torch.isfinite(gx).all()
    x2 = x.detach()
    t2 = t.clone().requires_grad_()
    (gt,) = torch.autograd.grad(rk.cond_rke_score(x2, t2, 1.0, 1.0), (t2,))
    rt = torch.autograd.grad(ref.cond_rke_score(x2, t2, 1.0, 1.0), (t2,))[0]
    assert (gt - rt).norm() <= 1e-10 * rt.norm()


def test_gradient_is_finite_for_extreme_sigma():
    x, _ = _xt(30, 3, 1)
    for s in (1e-4, 1e4):
        (gx,) = torch.autograd.grad(rk.rke_score(x, s), (x,))
        assert torch.isfinite(gx).all()


@pytest.mark.parametrize("flush", [1, 2, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_forward_backward_equals_the_two_pass_path(dtype, tol, flush, monkeypatch):
    # rke_score with one bandwidth and x requiring grad: F_x and dF_x/dx in one pass
    # (ops.score_and_grad); the same numbers as the forward then the streamed backward, whenever
    # the partial sums are flushed into float64 (6 row blocks of at most 5 tiles here)
    from rkekernels.ops import score_and_grad

    monkeypatch.setattr(score_and_grad, "FLUSH", flush)

    x, _ = _xt(45, 7, 1, dtype)
    xc = (x - x.mean(0)).detach()
    fx, grad = score_and_grad.sum_and_grad(xc, 0.3)
    fx2, _, _ = scores_torch.forward_sums(xc, None, (0.3,), None)
    one = torch.ones(1, dtype=torch.float64)
    g2, _ = scores_torch.backward_grads(xc, None, (0.3,), None, one, None, None)
    assert grad.dtype == dtype
    assert abs(float(fx / fx2[0]) - 1) <= tol
    assert (grad.double() - g2.double()).norm() <= tol * g2.double().norm()
    # and against the reference, through the public score with an incoming gradient != 1
    y = rk.rke_score(x, 1 / 0.3**0.5).double().log() * -2.5
    (gx,) = torch.autograd.grad(y, x)
    xr = x.detach().double().requires_grad_()
    (rx,) = torch.autograd.grad(ref.rke_score(xr, 1 / 0.3**0.5).log() * -2.5, xr)
    assert (gx.double() - rx).norm() <= tol * rx.norm()


def test_fused_pass_taken_only_where_it_saves_work(monkeypatch):
    from rkekernels.ops import score_and_grad

    calls = []
    real = score_and_grad.sum_and_grad
    monkeypatch.setattr(
        score_and_grad, "sum_and_grad", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x, t = _xt(20, 3, 2)
    torch.autograd.grad(rk.rke_score(x, 1.0), x)
    assert calls == [1]  # one bandwidth, a gradient to come: fused, once
    rk.rke_score(x.detach(), 1.0)  # nothing to differentiate
    with torch.no_grad():
        rk.rke_score(x, 1.0)
    torch.autograd.grad(rk.rke_score(x, [1.0, 2.0]).sum(), x)  # 2 bandwidths: 2 passes cheaper
    torch.autograd.grad(rk.cond_rke_score(x, t, 1.0, 1.0), x)
    assert calls == [1]


def test_default_bandwidth_is_a_constant_in_the_gradient():
    """Issue 23 A.8 (documented in the docstrings): sigma=None gives d RKE / dx at the fixed
    default bandwidth of x; nothing flows through the bandwidth (it depends on x too)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    s, st = rk.default_bandwidth(x), rk.default_bandwidth(t)
    for fn, args, fixed in (
        (rk.rke_score, (), (s,)),
        (rk.cond_rke_score, (t,), (s, st)),
        (lambda x, t, *s: rk.rke_entropies(x, t, *s).h_x_given_t, (t,), (s, st)),
    ):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(fn(xa, *args), xa)
        (gb,) = torch.autograd.grad(fn(xb, *args, *fixed), xb)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=0)
