"""SPARKE guidance for diffusers pipelines, as a ``callback_on_step_end``.

    pipe(..., callback_on_step_end=sparke_callback(guidance))

At the end of denoising step i of N (``pipeline.num_timesteps``), after the scheduler has
produced the new latents, the callback calls::

    latents = guidance.apply(latents, cond, progress=i / N, step=i)
    if i == N - 1: guidance.commit(latents, cond)      # the finished batch joins the bank

so ``every`` counts pipeline steps (step 0 is guided), ``start``/``stop`` select a window of
``i / N``, and the latents the pipeline decodes are exactly the ones committed. The callback is a
`diffusers.callbacks.PipelineCallback`: the pipeline reads its ``tensor_inputs`` and hands it
``latents`` (and ``prompt_embeds`` when it needs them) by itself.

Prompt embeddings for conditional guidance (``guidance.sigma_cond`` set): ``cond`` if given
(used as given), else one vector per image pooled from the pipeline's ``prompt_embeds``: the mean
over tokens of the conditional half when classifier-free guidance doubles the batch (diffusers
concatenates ``[negative, positive]``, so the second half), divided by its L2 norm so that
``sigma_cond`` lives on the paper's scale for unit-normalised text embeddings (its s_c = 0.3 to
0.35 is ``sigma_cond = sqrt(2) s_c`` ~ 0.45 to 0.5 here). Any latent layout works
(SD/SDXL (b, c, h, w), packed sequence latents (b, tokens, c)): the features flatten each sample.

Needs diffusers (``pip install diffusers`` or ``pip install rkekernels[diffusers]``); importing
`rkekernels` itself never imports it.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from diffusers.callbacks import PipelineCallback
except ImportError as exc:  # pragma: no cover - exercised by a test with diffusers hidden
    raise ImportError(
        "rkekernels.adapters.diffusers needs the diffusers package: install it with "
        "`pip install diffusers` (or `pip install rkekernels[diffusers]`)"
    ) from exc

from ..sampling import DiversityGuidance, check_adapter_guidance

__all__ = ["SparkeCallback", "pool_prompt_embeds", "sparke_callback"]


def pool_prompt_embeds(
    prompt_embeds: torch.Tensor, batch_size: int, cfg: bool, *, normalize: bool = True
) -> torch.Tensor:
    """One prompt embedding per image from a pipeline's ``prompt_embeds``.

    Token embeddings (rows, tokens, m) are mean-pooled over tokens; (rows, m) are kept. When
    classifier-free guidance doubled the batch (``cfg`` and rows == 2 * batch_size), the second
    (conditional) half is used, as diffusers concatenates ``[negative, positive]``. With
    ``normalize`` each pooled row is divided by its L2 norm (an all-zero row stays zero).

    Args:
        prompt_embeds: (rows, tokens, m) or (rows, m) embeddings from the pipeline.
        batch_size: b, the number of latents being generated.
        cfg: whether the pipeline runs classifier-free guidance.
        normalize: return unit vectors (default).

    Returns:
        (b, m) float tensor on prompt_embeds' device.

    Raises:
        ValueError: a row count that matches neither b nor 2b (pass ``cond`` explicitly then).

    Example:
        >>> import torch
        >>> from rkekernels.adapters.diffusers import pool_prompt_embeds
        >>> neg, pos = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
        >>> pool_prompt_embeds(torch.cat([neg, pos]), batch_size=2, cfg=True)
        tensor([[0.5000, 0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000, 0.5000]])
    """
    pe = prompt_embeds
    if pe.dim() == 3:
        pe = pe.float().mean(dim=1)
    elif pe.dim() != 2:
        raise ValueError(
            f"prompt_embeds must be (rows, tokens, m) or (rows, m); got shape {tuple(pe.shape)}"
        )
    rows = pe.shape[0]
    if cfg and rows == 2 * batch_size:
        pe = pe[batch_size:]
    elif rows != batch_size:
        raise ValueError(
            f"cannot match prompt_embeds ({rows} rows) to {batch_size} latents "
            f"(classifier-free guidance: {cfg}); pass cond=(b, m) embeddings to sparke_callback"
        )
    pe = pe.float()
    if normalize:
        pe = pe / pe.norm(dim=1, keepdim=True).clamp_min(torch.finfo(pe.dtype).tiny)
    return pe


class SparkeCallback(PipelineCallback):
    """A diffusers `PipelineCallback` that applies a `DiversityGuidance` at every step end.

    Build it with `sparke_callback`. ``tensor_inputs`` is ``["latents"]``, plus
    ``"prompt_embeds"`` when the guidance is conditional and no ``cond`` was given.

    Attributes:
        guidance: the `DiversityGuidance` (its bank grows by one batch per pipeline call).
        cond: the fixed prompt embeddings, or None.
        normalize_cond: whether embeddings pooled from ``prompt_embeds`` are L2-normalised.
    """

    def __init__(
        self, guidance: DiversityGuidance, cond: Any = None, *, normalize_cond: bool = True
    ) -> None:
        super().__init__()
        check_adapter_guidance(guidance, cond)
        if cond is not None:
            cond = cond if isinstance(cond, torch.Tensor) else torch.as_tensor(cond)
            if cond.dim() == 3:
                cond = cond.float().mean(dim=1)
        self.guidance = guidance
        self.cond = cond
        self.normalize_cond = bool(normalize_cond)

    @property
    def tensor_inputs(self) -> list[str]:
        """The pipeline tensors this callback reads (and may return)."""
        if self.guidance.conditional and self.cond is None:
            return ["latents", "prompt_embeds"]
        return ["latents"]

    def _cond_for(self, pipeline: Any, kwargs: dict, latents: torch.Tensor) -> Any:
        if not self.guidance.conditional:
            return None
        if self.cond is not None:
            return self.cond.to(latents.device)
        cfg = bool(getattr(pipeline, "do_classifier_free_guidance", False))
        return pool_prompt_embeds(
            kwargs["prompt_embeds"], latents.shape[0], cfg, normalize=self.normalize_cond
        )

    def callback_fn(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict
    ) -> dict:
        """Guide ``callback_kwargs["latents"]`` at progress step_index / num_timesteps."""
        total = int(pipeline.num_timesteps)
        latents = callback_kwargs["latents"]
        cond = self._cond_for(pipeline, callback_kwargs, latents)
        progress = min(step_index / total, 1.0)
        latents = self.guidance.apply(latents, cond, progress=progress, step=step_index)
        if step_index == total - 1:
            self.guidance.commit(latents, cond)
        callback_kwargs["latents"] = latents
        return callback_kwargs


def sparke_callback(
    guidance: DiversityGuidance, cond: Any = None, *, normalize_cond: bool = True
) -> SparkeCallback:
    """A ``callback_on_step_end`` that applies SPARKE diversity guidance in a diffusers pipeline.

    At step i of N: ``latents = guidance.apply(latents, cond, progress=i/N, step=i)``; at the
    last step the final latents are committed to ``guidance.bank``. Reuse the same callback
    (or guidance) across pipeline calls: each batch is pushed away from all earlier ones.

    Args:
        guidance: a `rkekernels.DiversityGuidance` (schedule, scale, bank).
        cond: prompt embeddings for conditional guidance: (b, m), (m,) (one for all images)
            or token embeddings (b, tokens, m), mean-pooled; used as given otherwise. None:
            when the guidance is conditional, pooled from the pipeline's ``prompt_embeds`` at
            each step (`pool_prompt_embeds`).
        normalize_cond: divide embeddings pooled from ``prompt_embeds`` by their L2 norm
            (default), so ``sigma_cond`` is on the scale of unit vectors.

    Returns:
        A `SparkeCallback` (a `diffusers.callbacks.PipelineCallback`); pass it as
        ``callback_on_step_end``. The pipeline then takes its ``tensor_inputs`` from it.

    Raises:
        TypeError: guidance is not a DiversityGuidance.
        ValueError: cond given for an unconditional guidance (and, at run time, the errors of
            `DiversityGuidance.apply`).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from rkekernels import DiversityGuidance
        >>> from rkekernels.adapters.diffusers import sparke_callback
        >>> guide = DiversityGuidance(sigma=1.0, scale=0.1)
        >>> cb = sparke_callback(guide)        # pipe(..., callback_on_step_end=cb)
        >>> cb.tensor_inputs
        ['latents']
        >>> pipe = SimpleNamespace(num_timesteps=2, do_classifier_free_guidance=False)
        >>> lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> for i in range(2):                 # what the pipeline does after each step
        ...     lat = cb(pipe, i, None, {"latents": lat})["latents"]
        >>> len(guide.bank)
        3
    """
    return SparkeCallback(guidance, cond, normalize_cond=normalize_cond)
