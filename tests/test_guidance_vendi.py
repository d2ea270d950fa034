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
