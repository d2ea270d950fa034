"""Peer diversity methods for the frontier benchmark, written from their papers as baselines.

Both act on a k-diffusion style denoiser ``model(x, sigma, **kw) -> x0 estimate`` (the
convention of `rkekernels.toy.sample_euler`), the way `rkekernels.adapters.kdiffusion`'s
``guided_denoiser`` wraps SPARKE, so the three run through the same sampler at the same batch size.

- `ParticleGuidance`: Corso, Xu, Bortoli, Barzilay, Jaakkola, "Particle Guidance: non-I.I.D.
  Diverse Sampling with Diffusion Models", ICLR 2024 (arXiv:2310.13102). The b samples of a batch
  are sampled jointly: each one's score gets the gradient of a repulsive potential over the
  batch, ``score_i <- score_i - alpha_t grad_{x_i} Phi``, ``Phi = sum_{j != i} k(x_i, x_j)``,
  k an RBF kernel whose bandwidth is the median heuristic ``h = med_{ij} ||x_i - x_j||^2 /
  log b`` (their Section 5 and appendix, after SVGD). As in their Stable Diffusion experiments
  the kernel is evaluated on the denoised prediction D (the x0 estimate), with dD/dx taken as
  the identity. No memory across batches: the method is within-batch by design.
- `CADS`: Sadat, Buhmann, Bradley, Hilliges, Weber, "CADS: Unleashing the Diversity of
  Diffusion Models through Condition-Annealed Sampling", ICLR 2024 (arXiv:2310.17347). The
  condition embedding y is corrupted with Gaussian noise on a schedule,
  ``y_hat = sqrt(gamma(t)) y + s sqrt(1 - gamma(t)) n``, n ~ N(0, I), with the piecewise linear
  gamma(t) = 1 for t <= tau1, (tau2 - t) / (tau2 - tau1) between, 0 for t >= tau2 (t in [0, 1],
  t = 1 pure noise; defaults tau1 = 0.6, tau2 = 0.9), then rescaled to the clean embedding's
  mean and standard deviation and mixed back, ``psi * rescaled + (1 - psi) * y_hat`` (their
  Eq. 4 to 6; psi = 1 by default). Needs a model that takes the embedding itself
  (``model(x, sigma, emb=...)``): class-conditional models only.

Example:
    >>> import torch
    >>> from benchmarks.guidance_peers import particle_grad
    >>> g = particle_grad(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    >>> bool(g[0, 0] < 0 < g[1, 0])     # the two samples are pushed apart
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CADS", "ParticleGuidance", "cads_gamma", "cads_noise", "particle_grad"]


def particle_grad(d: torch.Tensor) -> torch.Tensor:
    """-grad_{x_i} sum_{j != i} k(x_i, x_j), the RBF repulsion of Particle Guidance.

    ``k(a, b) = exp(-||a - b||^2 / h)``, ``h = median_{i<j} ||x_i - x_j||^2 / log b`` (the
    median heuristic; b = 2 uses log 2), so ``-grad_i = sum_j (2 / h) (x_i - x_j) k_ij``.
    A batch of one (or all rows equal) gets a zero gradient.

    Args:
        d: (b, ...) the batch (flattened per row).

    Returns:
        (b, ...) the repulsive direction for each row, float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> particle_grad(torch.zeros(3, 2)).abs().sum().item()
        0.0
    """
    b = d.shape[0]
    x = d.reshape(b, -1).to(torch.float64 if d.dtype == torch.float64 else torch.float32)
    if b < 2:
        return torch.zeros_like(x).reshape(d.shape)
    d2 = torch.cdist(x, x) ** 2
    iu = torch.triu_indices(b, b, offset=1)
    med = float(d2[iu[0], iu[1]].median())
    if med <= 0.0:
        return torch.zeros_like(x).reshape(d.shape)
    h = med / math.log(max(b, 2))
    k = torch.exp(-d2 / h)
    k.fill_diagonal_(0.0)
    g = (2.0 / h) * (k.sum(1, keepdim=True) * x - k @ x)
    return g.reshape(d.shape)


class ParticleGuidance:
    """A denoiser with Particle Guidance: ``D' = D + alpha * sigma^2 * (-grad Phi(D))``.

    In denoiser form (score = (D - x) / sigma^2), adding ``alpha * (-grad Phi)`` to the score
    is adding ``alpha * sigma^2 * (-grad Phi)`` to D; alpha is the strength swept by the
    benchmark (their alpha_t, constant over t).

    Args:
        model: ``model(x, sigma, **kw) -> D``.
        alpha: the strength (>= 0; 0 is the plain model).

    Example:
        >>> import torch
        >>> pg = ParticleGuidance(lambda x, s: x, alpha=0.1)
        >>> out = pg(torch.tensor([[0.0], [1.0]]), torch.ones(2))
        >>> bool(out[0] < 0.0 and out[1] > 1.0)
        True
    """

    def __init__(self, model: Callable[..., torch.Tensor], alpha: float) -> None:
        self.model, self.alpha = model, float(alpha)

    def __call__(self, x: torch.Tensor, sigma: Any, **kw: Any) -> torch.Tensor:
        d = self.model(x, sigma, **kw)
        if self.alpha == 0.0:
            return d
        s = torch.as_tensor(sigma, dtype=d.dtype).reshape(-1)
        s = s.reshape((-1,) + (1,) * (d.dim() - 1)) if s.numel() > 1 else s.reshape(())
        return d + self.alpha * s**2 * particle_grad(d).to(d.dtype)


def cads_gamma(t: float, tau1: float = 0.6, tau2: float = 0.9) -> float:
    """CADS's annealing schedule gamma(t): 1 for t <= tau1, linear down to 0 at tau2, then 0.

    t in [0, 1] runs from data (0) to pure noise (1).

    Example:
        >>> [cads_gamma(t) for t in (0.5, 0.75, 0.95)]
        [1.0, 0.5, 0.0]
    """
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def cads_noise(
    y: torch.Tensor, gamma: float, s: float, psi: float = 1.0, generator: Any = None
) -> torch.Tensor:
    """CADS's corrupted condition (their Eq. 4 to 6) for embeddings y (b, m).

    ``y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n``; ``y_res = (y_hat - mean(y_hat)) /
    std(y_hat) * std(y) + mean(y)`` (moments over all entries); returns
    ``psi * y_res + (1 - psi) * y_hat``.

    Example:
        >>> import torch
        >>> y = torch.randn(4, 8)
        >>> torch.equal(cads_noise(y, 1.0, 0.5), y)      # gamma = 1: the clean condition
        True
    """
    if gamma >= 1.0 or s == 0.0:
        return y
    n = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    y_hat = math.sqrt(gamma) * y + s * math.sqrt(1.0 - gamma) * n
    y_res = (y_hat - y_hat.mean()) / y_hat.std().clamp_min(1e-12) * y.std() + y.mean()
    return psi * y_res + (1.0 - psi) * y_hat


class CADS:
    """A class-conditional denoiser with condition-annealed sampling.

    ``model(x, sigma, emb=y)`` is called with the corrupted embedding `cads_noise` of
    ``y = embed(cond)``; t is the sampler's progress mapped to noise (t = 1 - i / steps at step
    i of ``sigmas``).

    Args:
        model: ``model(x, sigma, emb=...) -> D``.
        embed: ``embed(cond) -> (b, m)`` the clean class embeddings.
        sigmas: the sampler's schedule (steps + 1,).
        s: the noise scale (0 is the plain model). tau1, tau2, psi: as in the paper.
        seed: seed of the condition noise.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        embed: Callable[[Any], torch.Tensor],
        sigmas: torch.Tensor,
        s: float,
        tau1: float = 0.6,
        tau2: float = 0.9,
        psi: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.model, self.embed, self.s = model, embed, float(s)
        self.sigmas = sigmas.double().cpu()
        self.tau1, self.tau2, self.psi = tau1, tau2, psi
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, sigma: Any, cond: Any = None) -> torch.Tensor:
        steps = self.sigmas.numel() - 1
        sv = float(torch.as_tensor(sigma).max())
        i = min(max(int((self.sigmas[:steps] >= sv * (1 - 1e-5)).sum()) - 1, 0), steps - 1)
        gamma = cads_gamma(1.0 - i / steps, self.tau1, self.tau2)
        y = self.embed(cond)
        return self.model(x, sigma, emb=cads_noise(y, gamma, self.s, self.psi, self.gen))
