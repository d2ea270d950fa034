"""`sparke_callback`: SPARKE as a diffusers ``PipelineCallback`` of your own making."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.callbacks import PipelineCallback

from ...sampling import DiversityGuidance
from .._checks import check_adapter_guidance
from .capture import auto_capture
from .cond import MASK_INPUTS, POOLED_INPUTS, _fixed_cond, pool_prompt_embeds


class SparkeCallback(PipelineCallback):
    """A diffusers `PipelineCallback` that applies a `DiversityGuidance` at every step end.

    Build it with `sparke_callback`. ``tensor_inputs`` is ``["latents"]``, plus
    ``"prompt_embeds"`` (or the ``pooled`` input) while it is `capturing`.

    Attributes:
        guidance: the `DiversityGuidance` (its bank grows by one batch per pipeline call).
        cond: the fixed prompt embeddings, or None.
        normalize_cond: whether embeddings pooled from ``prompt_embeds`` are L2-normalised.
    """

    def __init__(
        self,
        guidance: DiversityGuidance,
        cond: Any = None,
        *,
        normalize_cond: bool = True,
        pooled: str | None = None,
    ) -> None:
        super().__init__()
        check_adapter_guidance(guidance, cond)
        if pooled is not None and pooled not in POOLED_INPUTS:
            raise ValueError(f"pooled must be one of {POOLED_INPUTS} or None, got {pooled!r}")
        self.guidance = guidance
        self.cond = _fixed_cond(cond)
        self.normalize_cond = bool(normalize_cond)
        self.pooled = pooled

    @property
    def capturing(self) -> bool:
        """Whether the callback takes prompt embeddings from the pipeline: no ``cond`` was
        given and the guidance is conditional, or its ``sigma_cond`` is automatic (None) and its
        bank is empty or holds prompts (`sparke_callback`'s "Prompts")."""
        g = self.guidance
        if self.cond is not None or g.sigma_cond == math.inf:
            return False
        return g.conditional or auto_capture(g)

    @property
    def tensor_inputs(self) -> list[str]:
        """The pipeline tensors this callback reads (and may return)."""
        if self.capturing:
            return ["latents", self.pooled or "prompt_embeds"]
        return ["latents"]

    def _missing(self, pipeline: Any, name: str) -> ValueError:
        return ValueError(
            f"{type(pipeline).__name__} did not hand {name!r} to the SPARKE callback: pass "
            f"callback_on_step_end_tensor_inputs={self.tensor_inputs!r} to the pipeline call "
            "(pipelines that do not read PipelineCallback.tensor_inputs need it), or give "
            "cond= to sparke_callback, or use rkekernels.adapters.diffusers.sparke(pipe, guidance)"
        )

    def _cond_for(self, pipeline: Any, kwargs: dict, latents: torch.Tensor) -> Any:
        if self.cond is not None and self.guidance.sigma_cond != math.inf:
            return self.cond.to(latents.device)  # sigma_cond=None: conditional from here on
        if not self.capturing:
            return None
        want = self.pooled or "prompt_embeds"
        if not self.guidance.conditional and all(
            kwargs.get(n) is None for n in (want, *POOLED_INPUTS)
        ):  # automatic sigma_cond: a pipeline without prompt embeddings stays unconditional
            if want not in (getattr(pipeline, "_callback_tensor_inputs", None) or ()):
                return None
        cfg = getattr(pipeline, "do_classifier_free_guidance", None)
        cfg = None if cfg is None else bool(cfg)
        b = latents.shape[0]
        for name in POOLED_INPUTS:
            if kwargs.get(name) is not None:
                return pool_prompt_embeds(kwargs[name], b, cfg, normalize=self.normalize_cond)
        if self.pooled is not None or "prompt_embeds" not in kwargs:
            raise self._missing(pipeline, self.pooled or "prompt_embeds")
        mask = next((kwargs[k] for k in MASK_INPUTS if kwargs.get(k) is not None), None)
        pe = kwargs["prompt_embeds"]
        if mask is not None and (mask.dim() != 2 or mask.shape != pe.shape[:2]):
            mask = None
        return pool_prompt_embeds(pe, b, cfg, mask=mask, normalize=self.normalize_cond)

    def callback_fn(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict
    ) -> dict:
        """Guide ``callback_kwargs["latents"]`` at progress step_index / num_timesteps."""
        if "latents" not in callback_kwargs:
            raise self._missing(pipeline, "latents")
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
    guidance: DiversityGuidance,
    cond: Any = None,
    *,
    normalize_cond: bool = True,
    pooled: str | None = None,
) -> SparkeCallback:
    """A ``callback_on_step_end`` that applies SPARKE diversity guidance in a diffusers pipeline.

    At step i of N: ``latents = guidance.apply(latents, cond, progress=i/N, step=i)``; at the
    last step the final latents are committed to ``guidance.bank``. Reuse the same callback
    (or guidance) across pipeline calls: each batch is pushed away from all earlier ones.
    `sparke` does this for every pipeline (also those without callbacks) and checks that the
    guidance ran; use the callback where you pass callbacks yourself.

    Prompts, with no ``cond`` given, by ``guidance.sigma_cond``:

    - None (the default, automatic): the callback asks for ``prompt_embeds`` (or ``pooled``) in
      its ``tensor_inputs`` and the guidance is prompt-aware from the first step that gets them.
      A pipeline without them (none in its ``_callback_tensor_inputs``: Kandinsky 2.2's decoder,
      an unconditional pipeline) is guided unconditionally, without an error; a pipeline that
      has them but was not asked to hand them over raises the error that names
      ``callback_on_step_end_tensor_inputs``. A pipeline that checks ``tensor_inputs`` against
      its own list and has no ``prompt_embeds`` there (Stable Video Diffusion) refuses the
      callback: use ``sigma_cond=math.inf`` or `sparke` there. A bank that already holds rows
      committed without prompts keeps the guidance unconditional (``tensor_inputs`` is then
      ``["latents"]``).
    - a number: prompt-aware; a missing ``prompt_embeds`` is an error.
    - ``math.inf``: prompts ignored; ``tensor_inputs`` is ``["latents"]``.

    Args:
        guidance: a `rkekernels.DiversityGuidance` (schedule, scale, bank).
        cond: prompt embeddings for conditional guidance: (b, m), (m,) (one for all images)
            or token embeddings (b, tokens, m), mean-pooled; used as given otherwise. None:
            taken at each step from the callback arguments (`pool_prompt_embeds`): a pooled
            ``pooled_prompt_embeds`` / ``add_text_embeds`` where the pipeline hands one over,
            else ``prompt_embeds`` averaged over the tokens of its ``prompt_attention_mask`` /
            ``attention_mask`` (all tokens without one); see "Prompts".
        normalize_cond: divide pooled embeddings by their L2 norm (default), so ``sigma_cond``
            is on the scale of unit vectors.
        pooled: ask the pipeline for its pooled text embedding instead of ``prompt_embeds``:
            ``"pooled_prompt_embeds"`` (SD3) or ``"add_text_embeds"`` (SDXL, ControlNet SDXL).

    Returns:
        A `SparkeCallback` (a `diffusers.callbacks.PipelineCallback`); pass it as
        ``callback_on_step_end`` (and, for pipelines that do not read its ``tensor_inputs``,
        ``callback_on_step_end_tensor_inputs=cb.tensor_inputs``).

    Raises:
        TypeError: guidance is not a DiversityGuidance.
        ValueError: cond given to a guidance whose bank holds rows committed without cond; at
            run time a tensor the pipeline did not hand over (the message names
            ``callback_on_step_end_tensor_inputs``) and the errors of `DiversityGuidance.apply`.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from rkekernels import DiversityGuidance
        >>> from rkekernels.adapters.diffusers import sparke_callback
        >>> guide = DiversityGuidance(sigma=1.0, scale=0.1)
        >>> cb = sparke_callback(guide)        # pipe(..., callback_on_step_end=cb)
        >>> cb.tensor_inputs                   # sigma_cond=None: prompts wherever there are any
        ['latents', 'prompt_embeds']
        >>> pipe = SimpleNamespace(            # a pipeline without prompts: unconditional
        ...     num_timesteps=2, do_classifier_free_guidance=False, _callback_tensor_inputs=[]
        ... )
        >>> lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> for i in range(2):                 # what the pipeline does after each step
        ...     lat = cb(pipe, i, None, {"latents": lat})["latents"]
        >>> len(guide.bank), guide.conditional, cb.tensor_inputs
        (3, False, ['latents'])
    """
    return SparkeCallback(guidance, cond, normalize_cond=normalize_cond, pooled=pooled)
