"""The SPARKE variants of the frontier benchmark (issue 24 item 3) on tiny inputs."""

from __future__ import annotations

import pytest
import torch

import rkekernels as rk
from benchmarks.guidance_beyond import BeyondDenoiser, beyond_settings, shape_weight
from rkekernels.adapters.kdiffusion import guided_denoiser


def _guide(scale: float) -> rk.DiversityGuidance:
    g = rk.DiversityGuidance(sigma=1.0, scale=scale, normalize=False)
    g.commit(torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    return g


X = torch.tensor([[0.3, -0.2], [1.0, 0.4]], dtype=torch.float64)


def test_shapes():
    assert [shape_weight("const", s) for s in (10.0, 0.01)] == [1.0, 1.0]
    assert shape_weight("sigma", 0.5) == 0.5
    assert [shape_weight("mid", s) for s in (5.0, 3.0, 0.3, 0.1)] == [0.0, 1.0, 1.0, 0.0]
    assert [shape_weight("high", s) for s in (2.0, 0.5)] == [1.0, 0.0]
    with pytest.raises(ValueError):
        shape_weight("cosine", 1.0)
    kinds = {k for k, _, _ in beyond_settings(True)}
    assert {"sparke-x0jac", "sparke-latent", "sparke-cap", "sparke-sigma"} <= kinds


def test_x0_matches_the_library():
    def model(x, sigma):
        return 0.5 * x

    sig = torch.full((2,), 0.7, dtype=torch.float64)
    ours = BeyondDenoiser(model, _guide(0.3))(X, sig)
    lib = guided_denoiser(model, _guide(0.3))(X, sig)
    assert torch.allclose(ours, lib, atol=1e-12)


def test_x0_chain_rule_is_the_vjp():
    a = torch.tensor([[0.5, 0.2], [0.0, 0.1]], dtype=torch.float64)

    def model(x, sigma):
        return x @ a.T  # dD/dx = a

    guide = _guide(0.3)
    sig = torch.full((2,), 2.0, dtype=torch.float64)
    g = guide.grad(model(X, sig)).grad
    with torch.no_grad():  # the sampler's context
        out = BeyondDenoiser(model, guide, on="x0-jac")(X, sig)
    assert torch.allclose(out, model(X, sig) + 0.3 * 4.0 * g @ a, atol=1e-12)


def test_latent_and_cap():
    def model(x, sigma):
        return 0.5 * x

    guide = _guide(1.0)
    sig = torch.full((2,), 1.0, dtype=torch.float64)
    lat = BeyondDenoiser(model, guide, on="latent")(X, sig)
    assert torch.allclose(lat, 0.5 * X + guide.grad(X).grad, atol=1e-12)
    den = BeyondDenoiser(model, _guide(1e3), cap=0.1)
    out = den(X, sig)
    own = (X - 0.5 * X).norm(dim=1)
    assert torch.allclose((out - 0.5 * X).norm(dim=1), 0.1 * own, rtol=1e-9)
    assert den.ratios[0] > 0.1
    off = BeyondDenoiser(model, _guide(1.0), shape="mid")(X, torch.full((2,), 5.0))
    assert torch.equal(off, 0.5 * X)
