"""guidance_grad / DiversityGuidance with algorithm="vendi" and the cosine/linear kernels."""

import pytest
import torch

import rkekernels
from rkekernels import DiversityGuidance, guidance_grad


def _bank(seed=0, d=8):
    gen = torch.Generator().manual_seed(seed)
    e = torch.eye(d, dtype=torch.float64)
    big = e[0] + 0.05 * torch.randn(20, d, generator=gen, dtype=torch.float64)
    small = e[1] + 0.05 * torch.randn(6, d, generator=gen, dtype=torch.float64)
    z = e[0] + 0.05 * torch.randn(1, d, generator=gen, dtype=torch.float64)  # in the big mode
    return torch.cat([big, small]), z


def _vendi(bank, z, sigma, kernel):
    kw = {"sigma": sigma} if kernel == "gaussian" else {}
    return float(rkekernels.vendi_score(torch.cat([bank, z]), 1.0, kernel=kernel, **kw))


def _log_s(z, bank, **kw):
    return guidance_grad(z, bank, **kw).log_s


@pytest.mark.parametrize("kernel", ["gaussian", "cosine", "linear"])
@pytest.mark.parametrize("normalize", [False, True])
def test_vendi_step_raises_order1_score(kernel, normalize):
    bank, z = _bank()
    if normalize:
        bank = bank / bank.norm(dim=1, keepdim=True)
    kw = dict(sigma=0.5, normalize=normalize, algorithm="vendi", kernel=kernel)
    res = guidance_grad(z, bank, **kw)
    g = res.grad
    assert g.shape == z.shape and torch.isfinite(g).all() and g.norm() > 0
    before = _vendi(bank, rkekernels.features(z, normalize), 0.5, kernel)
    for eta in (0.02, 0.1):
        z2 = z + eta * g / g.norm() * z.norm()
        after = _vendi(bank, rkekernels.features(z2, normalize), 0.5, kernel)
        assert after > before, (eta, before, after)
    # log S is the objective whose negative gradient is returned: central differences agree
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    fd = (_log_s(z + h * v, bank, **kw) - _log_s(z - h * v, bank, **kw)) / (2 * h)
    assert torch.allclose(fd, -(g * v).sum(1), rtol=1e-5, atol=1e-8)


def test_vendi_conditional_and_batch():
    bank, z = _bank()
    gen = torch.Generator().manual_seed(2)
    c = torch.randn(len(bank), 3, generator=gen, dtype=torch.float64)
    y = c[:1] + 0.01
    kw = dict(sigma=0.5, sigma_cond=1.0, normalize=False, algorithm="vendi")
    g = guidance_grad(z, bank, cond=y, bank_cond=c, **kw).grad
    before = float(
        rkekernels.cond_vendi_score(torch.cat([bank, z]), torch.cat([c, y]), 1.0, 0.5, 1.0)
    )
    z2 = z + 0.05 * g / g.norm()
    after = float(
        rkekernels.cond_vendi_score(torch.cat([bank, z2]), torch.cat([c, y]), 1.0, 0.5, 1.0)
    )
    assert after > before
    # two samples in one batch: each counts the other (finite, and different from b = 1)
    zz = torch.cat([z, z + 0.01])
    res = guidance_grad(zz, bank, sigma=0.5, normalize=False, algorithm="vendi")
    solo = guidance_grad(
        zz, bank, sigma=0.5, normalize=False, algorithm="vendi", include_batch=False
    )
    assert torch.isfinite(res.grad).all() and not torch.allclose(res.grad, solo.grad)
    empty = guidance_grad(z, bank[:0], sigma=0.5, algorithm="vendi")
    assert torch.equal(empty.grad, torch.zeros_like(z)) and empty.log_s[0] == float("-inf")


@pytest.mark.parametrize("kernel", ["cosine", "linear"])
def test_rke_dot_kernels_match_autograd(kernel):
    bank, z = _bank()
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(len(bank), 2, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    zz = torch.cat([z, z.flip(1)]).requires_grad_(True)
    res = guidance_grad(zz.detach(), bank, cond=y, bank_cond=c, sigma=1.0, sigma_cond=0.7,
                        kernel=kernel)  # fmt: skip

    def unit(a):
        return a / a.norm(dim=1, keepdim=True) if kernel == "cosine" else a

    phi = zz / zz.norm(dim=1, keepdim=True)  # normalize=True
    w = torch.exp(-(torch.cdist(y, c) ** 2) / 0.49)
    s = (w * (unit(phi) @ unit(bank).T) ** 2).sum(1)
    other = unit(phi).detach().flip(0)  # the other sample of the batch, as a constant
    wb = torch.exp(-((y - y.flip(0)) ** 2).sum(1) / 0.49)
    s = s + wb * (unit(phi) * other).sum(1) ** 2
    (g,) = torch.autograd.grad(torch.log(s).sum(), zz)
    assert torch.allclose(res.log_s, torch.log(s).detach(), rtol=1e-12)
    assert torch.allclose(res.grad, -g, rtol=1e-10, atol=1e-12)


def test_diversity_guidance_algorithm_vendi():
    bank, z = _bank()
    g = DiversityGuidance(0.5, normalize=False, scale=0.05, algorithm="vendi")
    g.commit(bank)
    z2 = g.apply(z.clone())
    before, after = _vendi(bank, z, 0.5, "gaussian"), _vendi(bank, z2, 0.5, "gaussian")
    assert after > before
    assert g.last is None or torch.isfinite(torch.as_tensor(g.last.grad)).all()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"algorithm": "svd"}, "algorithm"),
        ({"kernel": "rbf"}, "kernel"),
        ({"algorithm": "vendi", "kernel": "cosine", "cond": "yes"}, "kernel='gaussian'"),
    ],
)
def test_bad_algorithm_or_kernel(kwargs, word):
    bank, z = _bank()
    if kwargs.pop("cond", None):
        kwargs.update(cond=torch.zeros(1, 2), bank_cond=torch.zeros(len(bank), 2), sigma_cond=1.0)
    with pytest.raises(ValueError, match=word):
        guidance_grad(z, bank, sigma=1.0, **kwargs)
    if "cond" not in kwargs:
        with pytest.raises(ValueError, match=word):
            DiversityGuidance(1.0, **kwargs)


def _dot_rke_logsumexp(z, bank, y, c, sigma_cond, kernel):
    """Autograd reference in float64: log S = logsumexp_j(log w_j + log (psi . g_j)^2), with the
    other samples of the batch as constant entries (their own prompts as c)."""
    zz = z.double().clone().requires_grad_(True)

    def unit(a):
        return a / a.norm(dim=1, keepdim=True) if kernel == "cosine" else a

    psi = unit(zz / zz.norm(dim=1, keepdim=True))  # normalize=True
    rows, cs = unit(bank.double()), c.double()
    logw = -(torch.cdist(y.double(), cs) ** 2) / sigma_cond**2
    terms = logw + torch.log((psi @ rows.T) ** 2)
    if len(z) > 1:
        lb = -(torch.cdist(y.double(), y.double()) ** 2) / sigma_cond**2
        lb = lb + torch.log((psi @ psi.detach().T) ** 2)
        terms = torch.cat([terms, lb.fill_diagonal_(float("-inf"))], 1)
    log_s = torch.logsumexp(terms, 1)
    (g,) = torch.autograd.grad(log_s.sum(), zz)
    return log_s.detach(), -g


@pytest.mark.parametrize("kernel", ["cosine", "linear"])
def test_rke_dot_kernels_small_sigma_cond_do_not_underflow(kernel):
    """Issue 23 A.2: the prompt weights e^-10000 underflowed (float64: log S = -inf, grad 0;
    float32 at sigma_cond 0.1: the gradient 5 orders of magnitude too small)."""
    z, bank = torch.tensor([[1.0, 0.2]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y, c = torch.tensor([[0.0]]), torch.tensor([[1.0], [1.5]])
    kw = dict(sigma=1.0, kernel=kernel)
    res = guidance_grad(z.double(), bank.double(), cond=y.double(), bank_cond=c.double(),
                        sigma_cond=0.01, **kw)  # fmt: skip
    want_s, want_g = _dot_rke_logsumexp(z, bank, y, c, 0.01, kernel)
    assert abs(float(res.log_s[0]) - -10000.0392207143) < 1e-9
    torch.testing.assert_close(res.log_s, want_s, rtol=1e-14, atol=0)
    torch.testing.assert_close(res.grad, want_g, rtol=1e-12, atol=1e-14)
    assert torch.allclose(res.grad, torch.tensor([[-1 / 13, 5 / 13]], dtype=torch.float64))
    res32 = guidance_grad(z, bank, cond=y, bank_cond=c, sigma_cond=0.1, **kw)
    want_s, want_g = _dot_rke_logsumexp(z, bank, y, c, 0.1, kernel)
    assert res32.grad.dtype == torch.float32
    torch.testing.assert_close(res32.log_s.double(), want_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(res32.grad.double(), want_g, rtol=0, atol=1e-6)
    # two samples: the other one is an entry too (its own weight shifted with the bank's)
    z2, y2 = torch.tensor([[1.0, 0.2], [0.3, 1.0]]), torch.tensor([[0.0], [1.4]])
    res2 = guidance_grad(z2.double(), bank.double(), cond=y2.double(), bank_cond=c.double(),
                         sigma_cond=0.01, **kw)  # fmt: skip
    want_s, want_g = _dot_rke_logsumexp(z2, bank, y2, c, 0.01, kernel)
    torch.testing.assert_close(res2.log_s, want_s, rtol=1e-14, atol=0)
    torch.testing.assert_close(res2.grad, want_g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_vendi_cache_sees_an_in_place_edit_that_keeps_the_sums(monkeypatch, as_numpy):
    """Issue 23 A.5: the decomposition cache, keyed on (shape, address, sum, sum of squares),
    returned the old log S after a swap of two entries of a row."""
    from rkekernels.ops import guidance_kernels as gk

    gen = torch.Generator().manual_seed(0)
    bank = torch.randint(-4, 5, (30, 4), generator=gen).double()  # exact sums
    z = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    if as_numpy:
        bank, z = bank.numpy(), z.numpy()
    calls = []
    moment = gk._bank_moment
    monkeypatch.setattr(gk, "_bank_moment", lambda *a: calls.append(1) or moment(*a))
    kw = dict(sigma=1.0, normalize=False, algorithm="vendi", kernel="linear")
    gk._CACHE.clear()
    first = float(guidance_grad(z, bank, **kw).log_s[0])
    assert float(guidance_grad(z, bank, **kw).log_s[0]) == first and len(calls) == 1  # a hit
    bank[0, [0, 1]] = bank[0, [1, 0]].copy() if as_numpy else bank[0, [1, 0]].clone()
    edited = float(guidance_grad(z, bank, **kw).log_s[0])
    gk._CACHE.clear()
    fresh = float(guidance_grad(z, bank, **kw).log_s[0])
    assert edited == fresh and abs(edited - first) > 0.1  # -4.3088 against -3.9501


def test_vendi_objective_is_the_documented_one_when_k_zz_is_not_1():
    """Issue 23 A.6: docs/math.md's T = tr C + ||psi||^2 and eps = ||psi||^2 / 2, the sample's
    own k(z, z); the code used the bank's mean k(x, x) (linear kernel, normalize=False)."""
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    bank = bank / bank.norm(dim=1, keepdim=True)  # mean k(x, x) = 1, k(z, z) = 2.41 and 0.25
    z = torch.tensor([[1.5, 0.4], [0.3, -0.4]], dtype=torch.float64)
    res = guidance_grad(z, bank, sigma=1.0, normalize=False, algorithm="vendi", kernel="linear",
                        include_batch=False)  # fmt: skip
    zz = z.clone().requires_grad_(True)
    lam, vecs = torch.linalg.eigh(bank.T @ bank)
    p = lam / lam.sum()
    h = -(p * p.log()).sum()
    log_s = []
    for psi in zz:  # psi^T (L + H I) psi, L = log((C + ||psi||^2 / 2 I) / (tr C + ||psi||^2))
        a = psi @ psi
        ell = vecs @ torch.diag(torch.log((lam + a / 2) / (lam.sum() + a))) @ vecs.T
        log_s.append(psi @ (ell + h * torch.eye(2, dtype=torch.float64)) @ psi)
    log_s = torch.stack(log_s)
    (g,) = torch.autograd.grad(log_s.sum(), zz)
    torch.testing.assert_close(res.log_s, log_s.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.grad, -g, rtol=1e-10, atol=1e-13)
