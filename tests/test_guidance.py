"""guidance_grad / features on the torch path against float64 autograd of the reference objective.

Tolerances (fixed per dtype, SPEC section 5). float64 input: relative error <= 1e-10.
float32 input: the gradient is (2/s^2)(phi - sum_j pi_j f_j) chained through the feature map; every
term is a float32 dot product or a softmax-weighted mean (relative error ~ few eps * log(n+1) for
the sizes here), and the logits' absolute error is ~eps (||phi||^2 + ||f||^2)/s^2 (O(1e-7) with the
bandwidths used), so the gradient's relative error in norm is ~1e-6: 1e-5 leaves a margin of 10
yet fails on any real mistake (a wrong weight changes it by O(1)). log S: same bound, relative.
"""

import math

import numpy as np
import pytest
import torch

from rkekernels import FeatureBank, GuidanceResult, features, guidance_grad
from rkekernels import reference as ref
from rkekernels.ops import guidance_cpu, guidance_torch
from rkekernels.ops.guidance_common import BankSide
from tests.conftest import TOL as RTOL
from tests.conftest import rel

CHUNK = 8  # rows per chunk (GEMM path: CHUNK_ROWS) or block (fused kernel: BLOCK_ROWS)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(guidance_torch, "CHUNK_ROWS", CHUNK)
    monkeypatch.setattr(guidance_cpu, "BLOCK_ROWS", CHUNK)


@pytest.fixture(params=["fused", "rows_first", "samples_first"])
def layout(request, monkeypatch):
    # the CPU torch backend's two paths: the fused numba kernel (the default where numba is
    # installed, as in the test extra) and the chunked GEMMs, in both layouts of the logits:
    # (rows, D) @ (D, b) and (b, D) @ (D, rows)
    if request.param == "fused":
        assert guidance_cpu.available(), "the test extra installs numba"
        monkeypatch.setattr(guidance_cpu, "ENABLED", True)
        return request.param
    monkeypatch.setattr(guidance_cpu, "ENABLED", False)
    limit = 10**9 if request.param == "rows_first" else 0
    monkeypatch.setattr(guidance_torch, "ROWS_FIRST_MAX_DIM", limit)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_case(b, n, *, normalize, prompts, dtype=torch.float32, seed=0, m=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    f = torch.randn(n, 256, generator=g, dtype=torch.float64)
    if normalize:
        f = f / f.norm(dim=1, keepdim=True)
    f = f.to(dtype)
    kw = {"sigma": 0.7 if normalize else 12.0, "normalize": normalize}
    if prompts:
        kw["cond"] = torch.randn(b, m, generator=g, dtype=torch.float64).to(dtype)
        kw["bank_cond"] = torch.randn(n, m, generator=g, dtype=torch.float64).to(dtype)
        kw["sigma_cond"] = 1.5
    return z, f, kw


def check_against_reference(z, bank, kw, res, rtol):
    g_ref, ls_ref = ref.guidance_grad(z, bank, **kw)
    assert isinstance(res, GuidanceResult)
    assert res.grad.shape == z.shape and res.grad.dtype == z.dtype
    assert res.log_s.shape == (z.shape[0],) and res.log_s.dtype == z.dtype
    assert rel(res.grad, g_ref) <= rtol
    finite = torch.isfinite(ls_ref)
    assert torch.equal(torch.isfinite(res.log_s), finite)
    if finite.any():
        assert rel(res.log_s[finite], ls_ref[finite]) <= rtol


# ------------------------------------------------------------------------------ correctness


@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("prompts", [False, True])
@pytest.mark.parametrize("include_batch", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("as_bank", [False, True])
def test_matches_reference(small_chunks, layout, as_bank, normalize, include_batch, prompts, b, n):
    z, f, kw = make_case(b, n, normalize=normalize, prompts=prompts, seed=n + 10 * b)
    kw["include_batch"] = include_batch
    if as_bank:
        bank = FeatureBank(n + 3)
        bank.add(f, kw.get("bank_cond"))
        call = {k: v for k, v in kw.items() if k != "bank_cond"}
        res = guidance_grad(z, bank, backend="torch", **call)
    else:
        res = guidance_grad(z, f, backend="torch", **kw)
    check_against_reference(z, f, kw, res, RTOL[torch.float32])


@pytest.mark.parametrize("prompts", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_float64_matches_reference(small_chunks, normalize, prompts):
    z, f, kw = make_case(
        3, 2 * CHUNK + 3, normalize=normalize, prompts=prompts, dtype=torch.float64
    )
    res = guidance_grad(z, f, **kw)
    check_against_reference(z, f, kw, res, RTOL[torch.float64])


def test_default_chunking_matches_reference():
    # default chunk size (CHUNK_ELEMENTS // D rows): with D = 256, 4096 rows per chunk
    rows = guidance_torch.chunk_rows(256)
    z, f, kw = make_case(3, rows + 5, normalize=True, prompts=True, seed=3)
    check_against_reference(z, f, kw, guidance_grad(z, f, **kw), RTOL[torch.float32])


def test_wrapped_feature_bank_equals_tensor_bank(small_chunks):
    z, f, kw = make_case(2, 30, normalize=True, prompts=True, seed=5)
    bank = FeatureBank(11)
    for i in range(0, 30, 4):  # wraps several times; the last 11 rows remain
        bank.add(f[i : i + 4], kw["bank_cond"][i : i + 4])
    call = {k: v for k, v in kw.items() if k != "bank_cond"}
    res = guidance_grad(z, bank, **call)
    kw_ref = dict(kw, bank_cond=kw["bank_cond"][-11:])
    check_against_reference(z, f[-11:], kw_ref, res, RTOL[torch.float32])


@pytest.mark.parametrize("sigma", [0.3, 3.0])
def test_shifted_and_running_max_states_agree(small_chunks, layout, sigma):
    # the two strategies (fixed bound shift, online running max) give the same softmax, in the
    # fused kernel and in the chunked GEMMs
    g = torch.Generator().manual_seed(21)
    phi = torch.randn(3, 40, generator=g, dtype=torch.float64)
    phi = phi / phi.norm(dim=1, keepdim=True)
    bank = torch.randn(2 * CHUNK + 5, 40, generator=g, dtype=torch.float64)
    y, c = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(21, 6, generator=g)
    inv_s2, inv_c2 = 1 / sigma**2, 0.5
    args = (phi, y, BankSide(bank, None, c.double(), None, inv_s2, inv_c2))
    shift = (phi * phi).sum(1) * inv_s2 + (y * y).sum(1) * inv_c2
    impl = guidance_cpu if layout == "fused" else guidance_torch
    m1, l1, a1 = impl.softmax_state(*args)
    m2, l2, a2 = impl.softmax_state(*args, shift=shift)
    assert torch.equal(m2, shift)
    assert torch.allclose(m1 + l1.log(), m2 + l2.log(), rtol=1e-12, atol=0)
    assert torch.allclose(a1 / l1[:, None], a2 / l2[:, None], rtol=1e-12, atol=1e-15)


def test_grad_is_descent_direction_of_log_s():
    # moving along -d log S / dz lowers log S (a check independent of the reference)
    z, f, kw = make_case(3, 20, normalize=True, prompts=False, dtype=torch.float64, seed=7)
    kw["include_batch"] = False  # the samples move together: no batch entries here
    res = guidance_grad(z, f, **kw)
    step = 1e-4 * res.grad / res.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    after = guidance_grad(z + step, f, **kw).log_s
    assert bool((after < res.log_s).all())
    # and the first-order change matches -|grad| * step length
    pred = -(res.grad * step).flatten(1).sum(1)
    assert torch.allclose(after - res.log_s, pred, rtol=1e-3, atol=0)


def test_features_matches_reference_and_keeps_autograd():
    z = torch.randn(3, 4, 5, requires_grad=True)
    phi = features(z)
    assert phi.shape == (3, 20)
    assert rel(phi.detach(), ref.features(z.detach())) <= 1e-6
    phi.sum().backward()
    assert z.grad is not None
    assert rel(features(z.detach(), normalize=False), z.detach().reshape(3, -1)) == 0.0
    out = features(np.ones((2, 3)))
    assert isinstance(out, np.ndarray) and np.allclose(out, 1 / math.sqrt(3))


def test_numpy_in_numpy_out():
    z, f, kw = make_case(2, 9, normalize=True, prompts=True, dtype=torch.float64)
    kwn = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    res = guidance_grad(z.numpy(), f.numpy(), **kwn)
    assert isinstance(res.grad, np.ndarray) and isinstance(res.log_s, np.ndarray)
    assert res.grad.shape == z.shape and res.grad.dtype == np.float64
    check_against_reference(z, f, kw, GuidanceResult(*map(torch.from_numpy, res)), 1e-10)


def test_works_under_no_grad_and_ignores_requires_grad():
    z, f, kw = make_case(3, 12, normalize=True, prompts=True)
    with torch.no_grad():
        res = guidance_grad(z, f, **kw)
    check_against_reference(z, f, kw, res, RTOL[torch.float32])
    res2 = guidance_grad(z.clone().requires_grad_(True), f, **kw)
    assert not res2.grad.requires_grad and torch.equal(res2.grad, res.grad)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("as_bank", [False, True])
def test_half_precision_bank(small_chunks, half, as_bank):
    z, f, kw = make_case(3, 2 * CHUNK + 1, normalize=True, prompts=True, seed=11)
    fh = f.to(half)
    if as_bank:
        bank = FeatureBank(64, dtype=half)
        bank.add(f, kw["bank_cond"])
        assert bank.features.dtype == half
        res = guidance_grad(z, bank, **{k: v for k, v in kw.items() if k != "bank_cond"})
    else:
        res = guidance_grad(z, fh, **kw)
    assert res.grad.dtype == torch.float32
    # math is float32 on the rounded features: compare with the reference on those
    check_against_reference(z, fh.float(), kw, res, RTOL[torch.float32])


# ------------------------------------------------------------------------------ extremes


@pytest.mark.parametrize("sigma", [1e-4, 1e4])
@pytest.mark.parametrize("include_batch", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_bandwidths_finite_and_exact(small_chunks, layout, sigma, include_batch, dtype):
    z, f, kw = make_case(3, 2 * CHUNK + 1, normalize=True, prompts=True, dtype=dtype, seed=13)
    kw.update(sigma=sigma, sigma_cond=sigma, include_batch=include_batch)
    res = guidance_grad(z, f, **kw)
    assert bool(torch.isfinite(res.grad).all()) and bool(torch.isfinite(res.log_s).all())
    g_ref, ls_ref = ref.guidance_grad(z, f, **kw)
    assert bool(torch.isfinite(g_ref).all()) and bool(torch.isfinite(ls_ref).all())
    check_against_reference(z, f, kw, res, RTOL[dtype])


def test_huge_coordinates_finite():
    g = torch.Generator().manual_seed(17)
    z = 1e6 + torch.randn(3, 4, 8, 8, generator=g)
    f = 1e6 + torch.randn(20, 256, generator=g)
    for normalize, sigma in [(False, 1.0), (False, 1e-4), (False, 1e4), (True, 1e-4)]:
        res = guidance_grad(z, f, sigma=sigma, normalize=normalize)
        assert bool(torch.isfinite(res.grad).all()), (normalize, sigma)
        assert bool(torch.isfinite(res.log_s).all()), (normalize, sigma)
    # normalised features are unit vectors: exact against the reference at a usual bandwidth
    kw = {"sigma": 0.01, "normalize": True}
    zs, fs = torch.randn(3, 64, generator=g) * 1e6, torch.randn(20, 64, generator=g) * 1e6
    fs = fs / fs.norm(dim=1, keepdim=True)
    check_against_reference(zs, fs, kw, guidance_grad(zs, fs, **kw), RTOL[torch.float32])


@pytest.mark.parametrize("as_bank", [False, True])
def test_empty_bank(as_bank):
    empty = FeatureBank(4) if as_bank else torch.zeros(0, 256)
    z = torch.randn(1, 4, 8, 8)
    res = guidance_grad(z, empty, sigma=0.5)
    assert torch.equal(res.grad, torch.zeros_like(z))
    assert res.log_s.shape == (1,) and res.log_s.item() == -math.inf
    # b > 1 with include_batch: the other samples still count
    z3 = torch.randn(3, 4, 8, 8)
    res3 = guidance_grad(z3, empty, sigma=0.5)
    check_against_reference(z3, torch.zeros(0, 256), {"sigma": 0.5}, res3, RTOL[torch.float32])
    assert bool(torch.isfinite(res3.log_s).all())
    res3 = guidance_grad(z3, empty, sigma=0.5, include_batch=False)
    assert torch.equal(res3.grad, torch.zeros_like(z3)) and bool((res3.log_s == -math.inf).all())


def test_prompts_with_empty_bank_and_batch():
    z = torch.randn(3, 16)
    cond = torch.randn(3, 4)
    res = guidance_grad(z, FeatureBank(5), cond=cond, sigma=0.8, sigma_cond=1.0)
    kw = {"cond": cond, "bank_cond": torch.zeros(0, 4), "sigma": 0.8, "sigma_cond": 1.0}
    check_against_reference(z, torch.zeros(0, 16), kw, res, RTOL[torch.float32])


def test_identical_prompts_equal_unconditional():
    # all prompts identical: every weight w_j = 1, the same as no prompts at all
    z, f, kw = make_case(3, 10, normalize=True, prompts=False, dtype=torch.float64)
    plain = guidance_grad(z, f, **kw)
    c = torch.ones(1, 3, dtype=torch.float64)
    cond = guidance_grad(z, f, cond=c.expand(3, 3), bank_cond=c.expand(10, 3), sigma_cond=0.1, **kw)
    assert rel(cond.grad, plain.grad) <= 1e-10 and rel(cond.log_s, plain.log_s) <= 1e-10


# ------------------------------------------------------------------------------ bad input


def test_bad_input():
    z, f, kw = make_case(2, 6, normalize=True, prompts=True)
    cond, bc = kw["cond"], kw["bank_cond"]
    with pytest.raises(ValueError, match="sigma_cond"):
        guidance_grad(z, f, cond=cond, bank_cond=bc, sigma=1.0)
    with pytest.raises(ValueError, match="bank has no prompt"):
        guidance_grad(z, f, cond=cond, sigma=1.0, sigma_cond=1.0)
    with pytest.raises(ValueError, match="cond is None"):
        guidance_grad(z, f, bank_cond=bc, sigma=1.0)
    with pytest.raises(ValueError, match="width"):
        guidance_grad(z, f[:, :100], sigma=1.0)
    with pytest.raises(ValueError, match="cond has width"):
        guidance_grad(z, f, cond=cond[:, :2], bank_cond=bc, sigma=1.0, sigma_cond=1.0)
    with pytest.raises(ValueError, match="cond must be 2-D"):
        guidance_grad(z, f, cond=cond[:1], bank_cond=bc, sigma=1.0, sigma_cond=1.0)
    with pytest.raises(ValueError, match="bank_cond must be 2-D"):
        guidance_grad(z, f, cond=cond, bank_cond=bc[:3], sigma=1.0, sigma_cond=1.0)
    with pytest.raises(ValueError, match="bank must be"):
        guidance_grad(z, f.reshape(6, 16, 16), sigma=1.0)
    for s in [0.0, -1.0, math.inf, math.nan]:
        with pytest.raises(ValueError, match="sigma"):
            guidance_grad(z, f, sigma=s)
        with pytest.raises(ValueError, match="sigma_cond"):
            guidance_grad(z, f, cond=cond, bank_cond=bc, sigma=1.0, sigma_cond=s)
    with pytest.raises(TypeError, match="sigma"):
        guidance_grad(z, f, sigma="1")
    with pytest.raises(ValueError, match="backend"):
        guidance_grad(z, f, sigma=1.0, backend="cuda")
    with pytest.raises(ValueError, match="device"):
        guidance_grad(z, f.to("meta"), sigma=1.0)
    with pytest.raises(TypeError, match="complex"):
        guidance_grad(z.to(torch.complex64), f, sigma=1.0)
    with pytest.raises(TypeError, match="string"):
        guidance_grad(z, np.array([["a"]]), sigma=1.0)
    with pytest.raises(ValueError, match="batch dimension"):
        guidance_grad(z[0, 0, 0], f, sigma=1.0)
    with pytest.raises(ValueError, match="all zeros"):
        guidance_grad(torch.zeros_like(z), f, sigma=1.0)
    with pytest.raises(ValueError, match="bank_cond must be None"):
        guidance_grad(z, FeatureBank(3), bank_cond=bc, sigma=1.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinite_bank_cond_is_named_even_when_it_only_drops_an_entry(layout, sign):
    """+/-inf in bank_cond against a prompt of the opposite sign gives a logit of -inf, not NaN.

    Both CPU paths turn a non-finite prompt norm into a NaN logit (no extra pass over bank_cond).
    """
    z, f, kw = make_case(2, 6, normalize=True, prompts=True)
    cond = torch.full_like(kw["cond"], -sign)
    bank_cond = kw["bank_cond"].clone()
    bank_cond[0, 0] = sign * math.inf
    with pytest.raises(ValueError, match=r"^bank_cond contains NaN or Inf"):
        guidance_grad(z, f, cond=cond, bank_cond=bank_cond, sigma=1.0, sigma_cond=1.0)


@pytest.mark.parametrize("where", ["z", "bank", "cond", "bank_cond"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_named(layout, where, bad):
    z, f, kw = make_case(2, 6, normalize=True, prompts=True)
    args = {"z": z.clone(), "bank": f.clone(), "cond": kw["cond"].clone()}
    args["bank_cond"] = kw["bank_cond"].clone()
    args[where].view(-1)[3] = bad
    with pytest.raises(ValueError, match=rf"^{where} contains NaN or Inf"):
        guidance_grad(
            args["z"],
            args["bank"],
            cond=args["cond"],
            bank_cond=args["bank_cond"],
            sigma=1.0,
            sigma_cond=1.0,
        )
