"""Sampler adapters: SPARKE guidance for existing samplers without forking them.

- `rkekernels.adapters.diffusers.sparke_callback(guidance, cond=None)`: a ``callback_on_step_end``
  for diffusers pipelines (needs ``pip install diffusers``).
- `rkekernels.adapters.kdiffusion.guided_denoiser(model, guidance, cond=None)`: wraps a
  k-diffusion style denoiser ``model(x, sigma, **kw) -> denoised`` (no dependency).

The submodules are imported on demand, so ``import rkekernels`` (and ``rkekernels.adapters``)
never imports diffusers.
"""

__all__ = ["diffusers", "kdiffusion"]
