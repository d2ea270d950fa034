"""The toy model is ground truth for the guidance demo, so it is checked against brute force."""

import math

import pytest
import torch

from rkekernels.toy import GaussianMixture, PromptWorld, get_sigmas_karras, sample_euler


def _quadrature_posterior_mean(means, weights, std, x, sigma):
    """E[x0 | x] for a 1-D mixture by brute-force quadrature of p(x0) N(x; x0, sigma^2)."""
    lo, hi = min(means) - 12 * std, max(means) + 12 * std
    grid = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
    prior = sum(w * torch.exp(-((grid - m) ** 2) / (2 * std**2)) for m, w in zip(means, weights))
    out = []
    for xi in x:
        # log-likelihood shifted by its max so that tiny sigma does not underflow
        ll = -((xi - grid) ** 2) / (2 * sigma**2)
        post = prior * torch.exp(ll - ll.max())
        out.append(float((post * grid).sum() / post.sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 2.0, 30.0])
def test_denoise_equals_quadrature_1d(sigma):
    means, weights, std = [-2.0, 0.5, 3.0], [0.6, 0.3, 0.1], 0.3
    gm = GaussianMixture(torch.tensor(means, dtype=torch.float64)[:, None], weights, std)
    x = torch.tensor([-3.0, -1.0, 0.0, 0.7, 1.8, 2.9, 5.0], dtype=torch.float64)
    got = gm.denoise(x[:, None], sigma)[:, 0]
    want = _quadrature_posterior_mean(means, weights, std, x.tolist(), sigma)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_denoise_equals_monte_carlo_posterior_mean_2d():
    gen = torch.Generator().manual_seed(1)
    means = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    gm = GaussianMixture(means, [0.5, 0.3, 0.2], std=0.5)
    x0 = gm.sample(400_000, generator=gen)
    x = torch.tensor([[0.5, 0.5], [1.5, 1.5], [-1.0, 1.0]], dtype=torch.float64)
    sigma = 0.8
    for xi, got in zip(x, gm.denoise(x, sigma)):
        logw = -((xi - x0) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        want = (w[:, None] * x0).sum(0)
        torch.testing.assert_close(got, want, rtol=0, atol=0.01)


def test_denoise_on_a_plane_equals_monte_carlo():
    gen = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(3, 2, generator=gen, dtype=torch.float64))
    gm = GaussianMixture(
        torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64), [0.7, 0.3], 0.5, basis=basis
    )
    assert gm.means.shape == (2, 3) and gm.dim == 3
    x0 = gm.sample(300_000, generator=gen)
    torch.testing.assert_close(x0 @ basis @ basis.t(), x0)  # samples lie on the plane
    x = torch.tensor([[0.3, -0.2, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    sigma = 0.7
    for xi, got in zip(x, gm.denoise(x, sigma)):
        w = torch.softmax(-((xi - x0) ** 2).sum(1) / (2 * sigma**2), 0)
        torch.testing.assert_close(got, (w[:, None] * x0).sum(0), rtol=0, atol=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoise_extreme_sigma(dtype):
    gm = GaussianMixture(torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=dtype), [0.75, 0.25], 0.5)
    x = torch.tensor([[4.0, 0.0], [1e6, -1e6], [-3.0, 2.0]], dtype=dtype)
    for s in (0.0, 1e-30, 1e-8):
        torch.testing.assert_close(gm.denoise(x, s), x)
    mean = torch.tensor([1.0, 0.0], dtype=dtype).expand(3, 2)
    for s in (1e8, 1e30, 3e38 if dtype == torch.float32 else 1e300):
        out = gm.denoise(x, s)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, mean, rtol=0, atol=1e-5)


def test_denoise_shapes_and_per_sample_sigma():
    gm = GaussianMixture(torch.randn(3, 6), [1.0, 2.0, 3.0], 0.2)
    x = torch.randn(4, 2, 3)
    sig = torch.tensor([0.1, 1.0, 5.0, 0.0])
    out = gm.denoise(x, sig)
    assert out.shape == x.shape
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], gm.denoise(x[i : i + 1], float(sig[i])))


def test_bad_input():
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture(torch.zeros(3), [1.0], 0.1)
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture(torch.zeros(2, 2), [1.0], 0.1)
    with pytest.raises(ValueError, match="weights must all be > 0"):
        GaussianMixture(torch.zeros(2, 2), [1.0, -1.0], 0.1)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        GaussianMixture(torch.zeros(2, 2), [1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="means contains NaN"):
        GaussianMixture(torch.tensor([[float("nan")]]), [1.0], 1.0)
    with pytest.raises(ValueError, match="orthonormal"):
        GaussianMixture(torch.zeros(1, 2), [1.0], 1.0, basis=torch.ones(3, 2))
    gm = GaussianMixture(torch.zeros(2, 2), [1.0, 1.0], 0.1)
    with pytest.raises(ValueError, match="3 features per sample but the mixture has d = 2"):
        gm.denoise(torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gm.denoise(torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match="one value per sample"):
        gm.denoise(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="sigma_min"):
        get_sigmas_karras(5, 0.0, 1.0)
    with pytest.raises(TypeError, match="needs cond"):
        PromptWorld(2).denoise(torch.zeros(1, 2), 1.0)


def test_karras_schedule():
    s = get_sigmas_karras(10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert (s[:-1] > s[1:]).all()
    torch.testing.assert_close(s[[0, 9]], torch.tensor([80.0, 0.002]))
    i = torch.arange(10, dtype=torch.float64) / 9
    want = (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(s[:-1].double(), want, rtol=1e-6, atol=0)


def test_euler_with_exact_denoiser_reproduces_the_mixture():
    weights = torch.tensor([0.6, 0.3, 0.1])
    gm = GaussianMixture([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], weights, std=0.2)
    sigmas = get_sigmas_karras(40, 0.002, 80.0)
    x = sigmas[0] * torch.randn(3000, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sample_euler(gm.denoise, x, sigmas, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(40))
    assert gm.precision(out) > 0.97
    # mode frequencies: sampling noise (~0.009) plus the first-order bias of 40 Euler steps (~0.02)
    freq = gm.mode_counts(out).double() / len(out)
    torch.testing.assert_close(freq, weights.double(), rtol=0, atol=0.05)
    assert freq[0] > freq[1] > freq[2] > 0.05
    # the spread inside a mode is the component's std
    idx, dist = gm.nearest_mode(out)
    spread = (dist[idx == 0] ** 2).mean().div(2).sqrt()  # E||x - mu||^2 = 2 std^2 in 2-D
    assert 0.85 < float(spread) < 1.15


def test_prompt_world_structure_and_conditional_denoiser():
    world = PromptWorld(n_prompts=5, modes_per_prompt=4, dominant=0.85, dim=16, seed=3)
    assert world.embeddings.shape == (5, 8) and world.means.shape[1] == 16
    assert world.groups.tolist() == [0, 0, 1, 1, 2]
    d = torch.cdist(world.embeddings, world.embeddings)
    assert d[0, 1] < 0.3 and d[2, 3] < 0.3 and d[0, 2] > 1.0 and d[1, 4] > 1.0
    assert world.shared_modes(0, 1) == 3 and world.shared_modes(0, 2) == 0
    for p in range(5):
        gm = world.mixture(p)
        assert gm.n_components == 4 and math.isclose(float(gm.weights[0]), 0.85, rel_tol=1e-6)
    # modes are well separated
    md = torch.cdist(world.means, world.means) + 1e9 * torch.eye(len(world.means))
    assert float(md.min()) >= 9.99 * world.std
    # conditioning by index or by embedding is the same; rows use their own prompt
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1, 2, 3, 4, 0])
    by_idx = world.denoise(x, 0.5, cond=idx)
    by_emb = world.denoise(x, 0.5, cond=world.embeddings[idx])
    torch.testing.assert_close(by_idx, by_emb)
    for i, p in enumerate(idx.tolist()):
        torch.testing.assert_close(by_idx[i], world.mixture(p).denoise(x[i : i + 1], 0.5)[0])
    sigmas = get_sigmas_karras(30, 0.002, 80.0)
    z = sigmas[0] * torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    out = sample_euler(world.denoise, z, sigmas, {"cond": 2})
    assert world.precision(out, 2) > 0.97
    assert world.to_plane(out).shape == (200, 2)
    with pytest.raises(ValueError, match="one prompt per sample"):
        world.denoise(x, 0.5, cond=torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="prompt must be in"):
        world.mixture(5)


def test_prompt_groups_never_share_a_direction():
    """As many groups as embedding dimensions: every cross-group pair stays far apart."""
    world = PromptWorld(n_prompts=16, modes_per_prompt=3, embed_dim=8, seed=0)
    d = torch.cdist(world.embeddings, world.embeddings)
    other = world.groups[:, None] != world.groups[None, :]
    assert float(d[other].min()) > 1.0
    with pytest.raises(ValueError, match="embed_dim must be >= the number of prompt groups"):
        PromptWorld(n_prompts=18, modes_per_prompt=3, embed_dim=8)
