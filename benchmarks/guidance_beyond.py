"""Beyond the peers (issue 24, item 3): SPARKE variants for the frontier benchmark.

Prototypes, measured by ``python -m benchmarks.bench_frontier --beyond`` with the protocol,
measures, seeds and cached models of the frontier, against SPARKE as the library ships it
(`rkekernels.adapters.kdiffusion.guided_denoiser`). Each variant changes one thing of

    D' = D + scale * w(sigma) * sigma^2 * f * g,     g = -grad log S (against the bank)

(f the prompt fade of `DiversityGuidance.step_fade`; what the library does: g taken on the
denoised prediction D with dD/dx taken as the identity, w = 1 on every step):

- **where g is taken** (``on``):
  - ``"x0"``: the library's rule (g on D, dD/dx ~ I);
  - ``"x0-jac"``: the exact chain rule, ``g_x = (dD/dx)^T g`` by one vector-Jacobian product
    through the denoiser (one extra backward pass per step). By Tweedie's formula
    ``dD/dx = Cov[x0 | x] / sigma^2`` (symmetric), so ``sigma^2 g_x = Cov[x0 | x] g``: the shift
    of D is the first-order change of the posterior mean when the posterior is tilted by
    ``exp(scale * -log S)``. It follows the data's directions at high noise (where the
    covariance is the data's, far below sigma^2 I: much weaker there, so larger scales) and
    reduces to the library's step at low noise (Cov ~ sigma^2 I);
  - ``"latent"``: g taken on the noisy latent x itself (as `DiversityGuidance.apply` does for
    a latent-space sampler), compared with a bank of clean samples.
- **the schedule's shape** (``shape``; the library: ``"const"``):
  - ``"sigma"``: w = sigma (strength proportional to the noise level; 1 at sigma = 1);
  - ``"mid"``: w = 1 for 0.3 <= sigma <= 3 (mid-noise, steps 7 to 17 of the 30), else 0;
  - ``"high"``: w = 1 for sigma >= 1 (steps 0 to 13), else 0: no push once the class is set;
  - ``"cskip"``: w = sd^2 / (sigma^2 + sd^2), sd = 0.6 (the models' sigma_data): the chain
    rule's size without its direction (dD/dx of isotropic Gaussian data with std sd), the
    ablation of ``"x0-jac"``.
- **a step rule that tracks precision** (``cap``): a per-sample trust region relative to the
  denoiser's own update, ``||Delta_a|| <= cap * ||x_a - D_a||`` with ``Delta = D' - D`` (the
  guidance's share of the Euler step against the model's share; ``||x - D|| / sigma`` is the
  denoiser's noise estimate, about sqrt(d) on the model's path). Cheap: two norms per sample.
  The guidance can then never dominate the model's direction, wherever the raw step would.
"""

from __future__ import annotations

from typing import Any

import torch

import rkekernels as rk

__all__ = ["BeyondDenoiser", "shape_weight"]

SD = 0.6  # sigma_data of the frontier's models (bench_frontier.SIGMA_DATA)


def shape_weight(shape: str, sigma: float) -> float:
    """The schedule's weight w(sigma) of a shape (see the module docstring).

    Example:
        >>> shape_weight("sigma", 2.0), shape_weight("mid", 5.0), shape_weight("high", 1.0)
        (2.0, 0.0, 1.0)
    """
    if shape == "const":
        return 1.0
    if shape == "sigma":
        return sigma
    if shape == "mid":
        return 1.0 if 0.3 <= sigma <= 3.0 else 0.0
    if shape == "high":
        return 1.0 if sigma >= 1.0 else 0.0
    if shape == "cskip":
        return SD**2 / (sigma**2 + SD**2)
    raise ValueError(f"unknown shape {shape!r}")


class BeyondDenoiser:
    """A k-diffusion denoiser with a SPARKE variant (``on``, ``shape``, ``cap``).

    ``denoiser(x, sigma, **kw) -> D'``, as `guided_denoiser` (schedule: every step); ``cond``
    the prompt embeddings of the batch (or None). ``ratios`` collects the mean
    ``||Delta|| / ||x - D||`` of each guided step (before the cap), for inspection.
    """

    def __init__(
        self,
        model: Any,
        guidance: rk.DiversityGuidance,
        cond: torch.Tensor | None = None,
        on: str = "x0",
        shape: str = "const",
        cap: float | None = None,
    ) -> None:
        if on not in ("x0", "x0-jac", "latent"):
            raise ValueError(f"unknown on={on!r}")
        shape_weight(shape, 1.0)
        self.model, self.guidance, self.cond = model, guidance, cond
        self.on, self.shape, self.cap = on, shape, cap
        self.ratios: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: Any, **kw: Any) -> torch.Tensor:
        s = float(torch.as_tensor(sigma).max())
        w = self.guidance.scale * shape_weight(self.shape, s)
        if w == 0.0:
            return self.model(x, sigma, **kw)
        if self.on == "x0-jac":
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                d = self.model(xr, sigma, **kw)
                g = self.guidance.grad(d.detach(), self.cond).grad
                (g,) = torch.autograd.grad(d, xr, grad_outputs=g.to(d.dtype))
            denoised = d.detach()
        else:
            denoised = self.model(x, sigma, **kw)
            at = x if self.on == "latent" else denoised
            g = self.guidance.grad(at, self.cond).grad
        b = x.shape[0]
        fade = self.guidance.step_fade(self.cond, b) if self.cond is not None else None
        if fade is not None:
            g = g * fade.to(g).reshape(b, 1)
        delta = (w * s**2) * g.to(denoised.dtype)
        own = (x - denoised).reshape(b, -1).norm(dim=1)
        norm = delta.reshape(b, -1).norm(dim=1)
        self.ratios.append(float((norm / own.clamp_min(1e-12)).mean()))
        if self.cap is not None:
            factor = torch.clamp(self.cap * own / norm.clamp_min(1e-12), max=1.0)
            delta = delta * factor.reshape(b, 1)
        return denoised + delta


def beyond_settings(conditional: bool) -> list[tuple[str, str, dict]]:
    """(kind, setting, options) of the variants swept by ``bench_frontier --beyond``.

    Options: ``scale`` for `rkekernels.DiversityGuidance`, ``on``, ``shape``, ``cap`` for
    `BeyondDenoiser`.
    """
    out = []
    for scale in (0.3, 0.5, 0.7, 1.0, 2.0, 3.0, 5.0, 10.0):
        out.append(
            ("sparke-x0jac", f"x0 chain rule, scale={scale}", dict(scale=scale, on="x0-jac"))
        )
    for scale in (0.3, 1.0, 3.0):
        out.append(
            ("sparke-latent", f"on the latent, scale={scale}", dict(scale=scale, on="latent"))
        )
    shapes = (("sigma", (0.01, 0.03, 0.1)), ("mid", (0.3, 1.0, 3.0)), ("high", (0.1, 0.3, 1.0)))
    shapes += (("cskip", (1.0, 3.0, 10.0)),)
    for shape, scales in shapes:
        for scale in scales:
            out.append(
                (f"sparke-{shape}", f"shape {shape}, scale={scale}", dict(scale=scale, shape=shape))
            )
    for cap in (0.003, 0.01, 0.03):
        out.append(("sparke-cap", f"cap {cap} x ||x - D||, scale=3.0", dict(scale=3.0, cap=cap)))
    del conditional  # the same sweep on both kinds of model
    return out
