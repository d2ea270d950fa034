"""The fused Triton kernels (rkekernels.ops.scores_triton) against the float64 dense reference.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1) on CPU
tensors; with one, the same tests run on CUDA tensors (the ``device`` parameter, from
tests/conftest.py). Sizes are small and odd (n = 1, 37, 65, 130; d = 1, 3, 20; on CUDA n = 257
instead of 65) because the interpreter is slow.

Tolerances (SPEC section 5), fixed per dtype:
- pair sums and scores: relative 1e-5 (float32 input), 1e-10 (float64 input: the Triton path
  computes float64 input in float64); entropies are logs, so the same numbers absolute.
- gradients, direct VJP: per row ||g_i - g_ref_i|| <= tol * sum_j |W|_ij (||x_i|| + ||x_j||),
  tol = 1e-5 / 1e-10. This is the error that float32 inputs carry by themselves: each term
  W_ij (x_j - x_i) of the gradient is known to a relative ~1e-7, the sum may cancel, so the
  tolerance scales with the sum of the term sizes, not with the (possibly tiny) result.
- gradients through the public API: ||g - g_ref||_inf <= 1e-4 ||g_ref||_inf for float32 (measured
  <= 3e-6 here; any real mistake, a lost tile or a wrong weight, is O(1)), 1e-10 for float64.
- TF32 / bfloat16 / TF32x3 modes: the bounds of `scores_triton.error_bound`.
"""

from __future__ import annotations

import math

import pytest
import torch

import rkekernels
from rkekernels import reference as ref
from rkekernels._input import check_backend

pytest.importorskip("triton")

from rkekernels.ops import scores_torch
from rkekernels.ops import scores_triton as st
from rkekernels.ops import triton_tuning as tuning
from tests.conftest import INTERPRETED, TOL, TRITON_DEVICES, rel

API_GRAD_TOL = TOL  # relative to the largest gradient entry (measured: <= 3e-6 in float32)

DEVICES = TRITON_DEVICES  # CUDA where present, else CPU tensors in the interpreter
DTYPES = [torch.float32, torch.float64]
# the last size leaves one row past a multiple of the row block (64 in the interpreter)
SIZES = [(1, 3, 2), (37, 1, 3), (130, 20, 5), (65 if INTERPRETED else 257, 3, 1)]


def _data(n, d, m, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return x.to(dtype).to(device), t.to(dtype).to(device)


def _bandwidths(x, t):
    """Bandwidths near the median distance (meaningful scores), as plain floats."""
    sx = float(ref.median_bandwidth(x.cpu())) if x.shape[0] > 1 else 1.0
    stt = float(ref.median_bandwidth(t.cpu())) if t.shape[0] > 1 else 1.0
    return [0.7 * sx, 1.9 * sx], stt


def _ref_sums(x, t, sigmas, sigma_t):
    out = [ref.pair_sums(x.cpu(), t.cpu(), s, sigma_t) for s in sigmas]
    return [o[0] for o in out], out[0][1], [o[2] for o in out]


def _ref_vjp(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt):
    """dL/dx, dL/dt of L = sum_k g_fx[k] F_x[k] + g_ft F_t + sum_k g_fxt[k] F_xt[k] (float64)."""
    xr = x.detach().cpu().double().requires_grad_(True)
    tr = t.detach().cpu().double().requires_grad_(True)
    loss = 0.0
    for k, s in enumerate(sigmas):
        fx, ft, fxt = ref.pair_sums(xr, tr, s, sigma_t)
        loss = loss + g_fx[k] * fx + g_fxt[k] * fxt
    loss = loss + g_ft * ft
    return torch.autograd.grad(loss, (xr, tr))


def _grad_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt):
    """sum_j |W|_ij (||x_i|| + ||x_j||) per row, for x and t: `reference.grad_term_scale`."""
    from rkekernels import reference

    return reference.grad_term_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)


def _cotangents(K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2 * K + 1, generator=gen, dtype=torch.float64)
    return g[:K], g[K], g[K + 1 :]


def _max_r2(v):
    vc = v.detach().cpu().double()
    return float(((vc - vc.mean(0)) ** 2).sum(1).max())


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "m"), SIZES)
def test_scores_match_reference(device, dtype, n, d, m):
    x, t = _data(n, d, m, dtype, device)
    sigmas, sigma_t = _bandwidths(x, t)
    tol = TOL[dtype]

    rke = rkekernels.rke_score(x, sigmas[0], backend="triton")
    assert rke.dtype == dtype and rke.shape == ()
    assert rel(rke, ref.rke_score(x.cpu(), sigmas[0])) <= tol

    cond = rkekernels.cond_rke_score(x, t, sigmas, sigma_t, backend="triton")
    assert cond.shape == (2,)
    for k, s in enumerate(sigmas):
        assert rel(cond[k], ref.cond_rke_score(x.cpu(), t.cpu(), s, sigma_t)) <= tol

    ent = rkekernels.rke_entropies(x, t, sigmas, sigma_t, backend="triton")
    for k, s in enumerate(sigmas):
        want = ref.rke_entropies(x.cpu(), t.cpu(), s, sigma_t)
        for got, exp in zip(ent, want):
            assert abs(float(got[k]) - float(exp)) <= tol, (k, got, exp)


@pytest.mark.parametrize("device", DEVICES)
def test_many_bandwidths_share_one_pass(device):
    """Five bandwidths over four decades in one launch; each equals its own reference."""
    x, t = _data(57, 7, 2, torch.float32, device)
    sigmas = [0.05, 0.5, 1.5, 5.0, 500.0]
    fx, ft, fxt = st.forward_sums(x - x.mean(0), t - t.mean(0), [1 / s**2 for s in sigmas], 1.0)
    rfx, rft, rfxt = _ref_sums(x, t, sigmas, 1.0)
    assert rel(ft, rft) <= 1e-5
    for k in range(len(sigmas)):
        assert rel(fx[k], rfx[k]) <= 1e-5
        assert rel(fxt[k], rfxt[k]) <= 1e-5
    # sigma -> 0: only the diagonal survives (F = n); sigma -> inf: every pair (F = n^2)
    assert float(fx[0]) == pytest.approx(57.0, rel=1e-6)
    assert float(fx[-1]) == pytest.approx(57.0**2, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_other_tilings_give_the_same_sums(device, monkeypatch):
    """Bands of 3 blocks of 16 rows (7 x 7 tiles, last band partial) and a wide backward tile."""
    fwd = dict(tuning.FWD_INTERP, BLOCK=16, GROUP=3)
    bwd = dict(tuning.BWD_INTERP, BLOCK_M=16, BLOCK_N=128)
    if device == "cuda":
        for name in ("_FWD_GPU", "_FWD_GPU_F64"):
            monkeypatch.setattr(tuning, name, [fwd])
        for name in ("_BWD_GPU", "_BWD_GPU_F64"):
            monkeypatch.setattr(tuning, name, [bwd])
    monkeypatch.setattr(tuning, "FWD_INTERP", fwd)
    monkeypatch.setattr(tuning, "BWD_INTERP", bwd)
    x, t = _data(100, 5, 3, torch.float64, device)
    sigmas, sigma_t = _bandwidths(x, t)
    inv = [1 / s**2 for s in sigmas]
    fx, ft, fxt = st.forward_sums(x - x.mean(0), t - t.mean(0), inv, 1 / sigma_t**2)
    rfx, rft, rfxt = _ref_sums(x, t, sigmas, sigma_t)
    assert rel(ft, rft) <= 1e-10
    for k in range(2):
        assert rel(fx[k], rfx[k]) <= 1e-10 and rel(fxt[k], rfxt[k]) <= 1e-10
    g_fx, g_ft, g_fxt = _cotangents(2)
    dev_g = [v.to(device) for v in (g_fx, g_ft, g_fxt)]
    gx, gt = st.backward_grads(x - x.mean(0), t - t.mean(0), inv, 1 / sigma_t**2, *dev_g)
    rgx, rgt = _ref_vjp(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)
    torch.testing.assert_close(gx.cpu(), rgx, rtol=1e-10, atol=1e-10 * float(rgx.abs().max()))
    torch.testing.assert_close(gt.cpu(), rgt, rtol=1e-10, atol=1e-10 * float(rgt.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_scales_stay_finite(device):
    x, _ = _data(37, 3, 1, torch.float32, device)
    far = x * 1e6
    assert float(rkekernels.rke_score(far, 1e-3, backend="triton")) == pytest.approx(37.0)
    assert float(rkekernels.rke_score(x, 1e12, backend="triton")) == pytest.approx(1.0)
    assert float(rkekernels.rke_score(far, 1e6, backend="triton")) == pytest.approx(
        float(ref.rke_score(far.cpu(), 1e6)), rel=1e-5
    )


# --------------------------------------------------------------------------- gradients


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "m"), SIZES)
def test_vjp_random_cotangents(device, dtype, n, d, m):
    x, t = _data(n, d, m, dtype, device, seed=2)
    sigmas, sigma_t = _bandwidths(x, t)
    inv = [1 / s**2 for s in sigmas]
    g_fx, g_ft, g_fxt = _cotangents(2, seed=n)
    dev_g = [v.to(device) for v in (g_fx, g_ft, g_fxt)]
    gx, gt = st.backward_grads(x - x.mean(0), t - t.mean(0), inv, 1 / sigma_t**2, *dev_g)
    assert gx.dtype == dtype and gx.shape == (n, d) and gt.shape == (n, m)
    rgx, rgt = _ref_vjp(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)
    sx, stt = _grad_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)
    tol = TOL[dtype]
    assert bool(((gx.cpu().double() - rgx).norm(dim=1) <= tol * sx + 1e-300).all())
    assert bool(((gt.cpu().double() - rgt).norm(dim=1) <= tol * stt + 1e-300).all())
    if n > 130:  # the partial paths below are size-independent: keep the interpreter time low
        return
    # the partial paths: one of the two gradients, one kind of cotangent
    gx1, gt1 = st.backward_grads(x - x.mean(0), t - t.mean(0), inv, 1 / sigma_t**2, *dev_g,
                                 need_t=False)  # fmt: skip
    assert gt1 is None and torch.equal(gx1, gx)
    gx2, gt2 = st.backward_grads(x - x.mean(0), t - t.mean(0), inv, 1 / sigma_t**2,
                                 None, dev_g[1], None, need_x=False)  # fmt: skip
    _, rgt2 = _ref_vjp(x, t, sigmas, sigma_t, 0 * g_fx, g_ft, 0 * g_fxt)
    assert gx2 is None
    _, stt2 = _grad_scale(x, t, sigmas, sigma_t, 0 * g_fx, g_ft, 0 * g_fxt)
    assert bool(((gt2.cpu().double() - rgt2).norm(dim=1) <= tol * stt2 + 1e-300).all())


def _assert_grad_close(got, want, dtype):
    scale = float(want.abs().max())
    err = float((got.detach().cpu().double() - want).abs().max())
    assert err <= API_GRAD_TOL[dtype] * scale, (err, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_through_public_scores(device, dtype):
    """rke_score not as the last op (incoming gradient -2.5), cond_rke_score w.r.t. x and t."""
    x, t = _data(37, 3, 2, dtype, device, seed=3)
    sigmas, sigma_t = _bandwidths(x, t)
    xg = x.clone().requires_grad_(True)
    tg = t.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(
        rkekernels.rke_score(xg, sigmas[0], backend="triton"), xg, torch.tensor(-2.5, dtype=dtype)
    )
    xr = x.detach().cpu().double().requires_grad_(True)
    (rgx,) = torch.autograd.grad(-2.5 * ref.rke_score(xr, sigmas[0]), xr)
    _assert_grad_close(gx, rgx, dtype)

    cond = rkekernels.cond_rke_score(xg, tg, sigmas[1], sigma_t, backend="triton")
    gx, gt = torch.autograd.grad(3.0 * cond, (xg, tg))
    xr = x.detach().cpu().double().requires_grad_(True)
    tr = t.detach().cpu().double().requires_grad_(True)
    rgx, rgt = torch.autograd.grad(3.0 * ref.cond_rke_score(xr, tr, sigmas[1], sigma_t), (xr, tr))
    _assert_grad_close(gx, rgx, dtype)
    _assert_grad_close(gt, rgt, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_random_cotangents_through_entropies(device, dtype):
    x, t = _data(130, 20, 5, dtype, device, seed=4)
    sigmas, sigma_t = _bandwidths(x, t)
    gen = torch.Generator().manual_seed(5)
    cot = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    tg = t.clone().requires_grad_(True)
    ent = rkekernels.rke_entropies(xg, tg, sigmas, sigma_t, backend="triton")
    loss = sum((v * cot[i].to(dtype).to(device)).sum() for i, v in enumerate(ent))
    gx, gt = torch.autograd.grad(loss, (xg, tg))
    xr = x.detach().cpu().double().requires_grad_(True)
    tr = t.detach().cpu().double().requires_grad_(True)
    rloss = 0.0
    for k, s in enumerate(sigmas):
        want = ref.rke_entropies(xr, tr, s, sigma_t)
        rloss = rloss + sum(cot[i, k] * v for i, v in enumerate(want))
    rgx, rgt = torch.autograd.grad(rloss, (xr, tr))
    _assert_grad_close(gx, rgx, dtype)
    _assert_grad_close(gt, rgt, dtype)


# --------------------------------------------------------------------------- precision modes


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["tf32", "bf16", "tf32x3"])
def test_precision_modes_within_stated_bounds(device, mode):
    x, t = _data(130, 8, 4, torch.float32, device, seed=6)
    sigmas, sigma_t = [2.0, 4.0], 2.0
    inv = [1 / s**2 for s in sigmas]
    xc, tc = x - x.mean(0), t - t.mean(0)
    s_t = _max_r2(t) / sigma_t**2
    with st.precision(mode):
        fx, ft, fxt = st.forward_sums(xc, tc, inv, 1 / sigma_t**2)
    exact = st.forward_sums(xc, tc, inv, 1 / sigma_t**2)
    rfx, rft, rfxt = _ref_sums(x, t, sigmas, sigma_t)
    errs = [rel(ft, rft)]
    assert errs[-1] <= st.error_bound(mode, s_t)
    for k, s in enumerate(sigmas):
        s_x = _max_r2(x) / s**2
        errs += [rel(fx[k], rfx[k]), rel(fxt[k], rfxt[k])]
        assert errs[-2] <= st.error_bound(mode, s_x)
        assert errs[-1] <= st.error_bound(mode, s_x + s_t)
    if mode != "tf32x3":  # the rounding is real (tf32x3 is exact float32 in the interpreter)
        assert max(errs) > 10 * max(rel(exact[0][0], rfx[0]), 1e-7)

    g_fx, g_ft, g_fxt = _cotangents(2, seed=7)
    dev_g = [v.to(device) for v in (g_fx, g_ft, g_fxt)]
    gx, gt = st.backward_grads(xc, tc, inv, 1 / sigma_t**2, *dev_g, precision=mode)
    rgx, rgt = _ref_vjp(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)
    sx, stt = _grad_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt)
    s_joint = _max_r2(x) / min(sigmas) ** 2 + s_t
    bound = st.error_bound(mode, s_joint, grad=True)
    assert bool(((gx.cpu().double() - rgx).norm(dim=1) <= bound * sx).all())
    assert bool(((gt.cpu().double() - rgt).norm(dim=1) <= bound * stt).all())


def test_error_bound_values():
    assert st.error_bound("ieee", 100.0) == 1e-5
    u = 2.0**-8
    assert st.error_bound("bf16", 2.0) == pytest.approx(math.expm1(16 * u * (1 + u)) + 1e-5)
    assert st.error_bound("tf32", 2.0) < st.error_bound("bf16", 2.0)
    assert st.error_bound("tf32x3", 2.0) < st.error_bound("tf32", 2.0)
    assert st.error_bound("bf16", 2.0, grad=True) > st.error_bound("bf16", 2.0)
    with pytest.raises(ValueError, match="precision must be one of"):
        st.error_bound("fp8", 1.0)


def test_precision_setting_and_context_manager():
    assert st.get_precision() == "ieee"
    with pytest.raises(ValueError, match="precision must be one of"):
        st.set_precision("tf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        st.forward_sums(torch.zeros(2, 1), None, (1.0,), None, precision="half")
    assert st.get_precision() == "ieee"
    with pytest.raises(RuntimeError, match="boom"), st.precision("bf16"):
        assert st.get_precision() == "bf16"
        raise RuntimeError("boom")
    assert st.get_precision() == "ieee"
    assert st.set_precision("tf32") == "ieee"
    assert st.set_precision("ieee") == "tf32"


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_on_cpu_is_torch_and_triton_agrees(dtype, monkeypatch):
    assert check_backend("auto", torch.device("cpu")) == "torch"
    x, _ = _data(130, 20, 1, dtype, "cpu", seed=8)
    want = rkekernels.rke_score(x, 3.0, backend="torch")

    def _fail(*args, **kwargs):
        raise AssertionError("backend='auto' on CPU must not run the Triton kernels")

    with monkeypatch.context() as mp:
        mp.setattr(st, "forward_sums", _fail)
        assert float(rkekernels.rke_score(x, 3.0)) == float(want)
        with pytest.raises(AssertionError, match="must not run"):
            rkekernels.rke_score(x, 3.0, backend="triton")
    if st.interpreted():
        got = rkekernels.rke_score(x, 3.0, backend="triton")
        assert rel(got, want) <= TOL[dtype]
        assert rel(got, ref.rke_score(x, 3.0)) <= TOL[dtype]


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(tuning, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
        st.forward_sums(torch.zeros(3, 2), None, (1.0,), None)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        st.backward_grads(torch.zeros(3, 2), None, (1.0,), None, None, None, None)


def test_torch_and_triton_backends_share_the_contract():
    """Same functions, same signature prefix: the dispatcher calls them interchangeably."""
    import inspect

    for name in ("forward_sums", "backward_grads"):
        a = list(inspect.signature(getattr(scores_torch, name)).parameters)
        b = list(inspect.signature(getattr(st, name)).parameters)
        # keyword-only options of the torch tiles (progress: the Triton launch reports nothing)
        positional = [p for p in a if p not in ("block_rows", "block_cols", "shard", "progress")]
        assert b[: len(positional)] == positional


@pytest.mark.parametrize("device", DEVICES)
def test_backward_uses_the_precision_of_its_forward(device):
    """A graph built under precision("bf16") differentiates in bf16 even after the block ends."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(40, 5, generator=g).to(device)
    x1 = x0.clone().requires_grad_()
    with st.precision("bf16"):
        y1 = rkekernels.rke_score(x1, 2.0, backend="triton")
    y1.backward()  # outside the block: the module setting is "ieee" again
    x2 = x0.clone().requires_grad_()
    with st.precision("bf16"):
        rkekernels.rke_score(x2, 2.0, backend="triton").backward()
    x3 = x0.clone().requires_grad_()
    rkekernels.rke_score(x3, 2.0, backend="triton").backward()
    assert torch.equal(x1.grad, x2.grad)
    assert not torch.equal(x1.grad, x3.grad)
