"""Sampler adapters: SPARKE guidance for existing samplers without forking them.

- `rkekernels.adapters.diffusers.sparke_callback(guidance, cond=None)`: a ``callback_on_step_end``
  for diffusers pipelines (needs ``pip install diffusers``).
- `rkekernels.adapters.kdiffusion.guided_denoiser(model, guidance, cond=None)`: wraps a
  k-diffusion style denoiser ``model(x, sigma, **kw) -> denoised`` (no dependency).

- `rkekernels.adapters.encoders.load_encoder(name)`: image encoders (pixels, clip, dinov2,
  inception) with their published pre-processing, for evaluation and encoder-feature guidance.

The submodules are imported on demand, so ``import rkekernels`` (and ``rkekernels.adapters``)
never imports diffusers.
"""

__all__ = ["diffusers", "encoders", "kdiffusion"]
