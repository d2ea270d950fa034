"""SPARKE guidance for diffusers pipelines: one context manager for every pipeline.

    with sparke(pipe, guidance):
        pipe(...)             # guided; its final latents join guidance.bank

`sparke` finds a way into each pipeline call without forking the pipeline:

- ``callback_on_step_end``, where ``pipe.__call__`` has it: a callback applies the guidance to
  ``latents`` after every scheduler step. `sparke` passes ``callback_on_step_end_tensor_inputs``
  itself (many pipelines never read ``PipelineCallback.tensor_inputs``); a callback of your own
  given to the call still runs, after the guidance, with the tensors it asks for.
- otherwise a wrapper of ``pipe.scheduler.step`` (which every denoising loop calls): the
  guidance is applied to the ``prev_sample`` it returns (PixArt-Alpha/Sigma, DiT). The old-style
  ``callback(step, t, latents)`` is not used: it cannot hand latents back.

At step i of N (N = ``pipe.num_timesteps`` on the callback route, ``len(scheduler.timesteps)``
on the scheduler route) the hook calls ``guidance.apply(latents, cond, progress=i / N, step=i)``;
when the call returns, the latents of the last step (exactly the ones the pipeline decodes) are
committed with their ``cond``. A call during which the hook never ran raises `SparkeError` with
the reason and the fix (a schedule that selects no step, or ``scale=0``, is not an error: the
hook ran). Everything is restored when the ``with`` block exits, also after an exception.

Prompt embeddings. With the default ``sigma_cond=None`` (automatic) they are captured whenever
the pipeline has prompt conditioning, and the guidance is prompt-aware from the first batch; a
pipeline without any (DDPM, DDIM) is guided unconditionally, and so is a guidance whose bank
already holds rows committed without prompts. A finite ``sigma_cond`` requires them;
``sigma_cond=math.inf`` ignores prompts and captures nothing. ``session.cond_source`` says what
was used (None: unconditional). They are taken in this order:

1. ``cond`` given to `sparke` (or `sparke_callback`): used as given, (b, m), (m,) or token
   embeddings (b, tokens, m), mean-pooled.
2. Class labels handed to the denoiser (DiT): ``one_hot(label, num_classes)``, the labels of the
   half that is not the null class under classifier-free guidance. Class-conditional guidance
   then pushes an image away from earlier images of its own class only (with ``sigma_cond``
   below about 0.8 the weight of another class is exp(-2 / sigma_cond^2) < 0.05).
3. The pipeline's own pooled text embedding, as handed to the denoiser: ``pooled_projections``
   (SD3, Flux) or ``added_cond_kwargs["text_embeds"]`` (SDXL, ControlNet SDXL; the
   ``add_text_embeds`` of its callbacks).
4. The token embeddings ``encoder_hidden_states`` (the ``prompt_embeds``), averaged over the
   tokens that are not padding: the mask is the denoiser's ``encoder_attention_mask`` (PixArt,
   Kandinsky 3) or ``encoder_hidden_states_mask`` (QwenImage, which passes None when no token
   is padding: all tokens then), else the attention mask of the pipeline's tokenizer applied
   to the call's ``prompt`` (SD 1.5/2.x and their img2img/inpainting, ControlNet SD,
   AnimateDiff, CogVideoX, Stable Audio; tokens past the tokenizer's length, Stable Audio's
   start/end-seconds embeddings, count as padding), else (``prompt_embeds`` passed without a
   prompt) all tokens. Rows repeated once per frame (AnimateDiff: b * frames rows for a
   denoiser batch of b) are collapsed to one per sample first.
5. With no token embeddings, a 2-D ``added_cond_kwargs["image_embeds"]`` (Kandinsky 2.2's
   decoders, whose only conditioning is the prior's image embedding). The list an IP-Adapter
   passes under that key is not taken.

Embeddings with 2b rows for b latents come from classifier-free guidance: the second half is the
conditional one (diffusers concatenates ``[negative, positive]``; DiT's class labels are
``[labels, null]`` and are told apart by the null label), whether or not the pipeline has a
``do_classifier_free_guidance`` attribute. With true CFG run as two denoiser calls (Flux
``true_cfg_scale``), the first call of each step (the positive prompt) is used. Pooled vectors
are divided by their L2 norm, so ``sigma_cond`` lives on the paper's scale for unit-normalised
text embeddings (its s_c = 0.3 to 0.35 is ``sigma_cond = sqrt(2) s_c`` ~ 0.45 to 0.5 here).

Under DiT's classifier-free guidance the scheduler steps a doubled batch ``[z, z]``; the hook
guides z once and writes the result into both halves, so the batch stays consistent and the
bank grows by b, not 2b. Any latent layout works ((b, c, h, w), packed (b, tokens, c), video
(b, frames, c, h, w)): the features flatten each sample.

`sparke_callback` stays for pipelines you call with a callback of your own making; it reads
``prompt_embeds`` (and, when listed in the pipeline's tensor inputs, ``pooled_prompt_embeds``,
``add_text_embeds``, ``prompt_attention_mask`` or ``attention_mask``) from the callback
arguments.

Needs diffusers (``pip install diffusers`` or ``pip install rkekernels[diffusers]``); importing
`rkekernels` itself never imports it.

Modules: `~.session` (`sparke`, `SparkeSession`), `~.routes` (its two routes), `~.capture` (the
denoiser's inputs and the prompt embeddings taken from them), `~.cond` (pooling, class labels),
`~.callback` (`sparke_callback`), `~.decoded` (`decoded_features`); every public name is
importable from ``rkekernels.adapters.diffusers``.
"""

from __future__ import annotations

try:
    import diffusers.callbacks  # noqa: F401  (the one check, before the modules that use it)
except ImportError as exc:  # pragma: no cover - exercised by a test with diffusers hidden
    raise ImportError(
        "rkekernels.adapters.diffusers needs the diffusers package: install it with "
        "`pip install diffusers` (or `pip install rkekernels[diffusers]`)"
    ) from exc

from .callback import SparkeCallback, sparke_callback
from .cond import (
    DENOISERS,  # noqa: F401
    MASK_INPUTS,  # noqa: F401
    POOLED_INPUTS,  # noqa: F401
    SparkeError,
    class_label_cond,
    pool_prompt_embeds,
)
from .decoded import DecodedFeatures, decode_latents, decoded_features
from .session import SparkeSession, sparke

__all__ = [
    "DecodedFeatures",
    "SparkeCallback",
    "SparkeError",
    "SparkeSession",
    "class_label_cond",
    "decode_latents",
    "decoded_features",
    "pool_prompt_embeds",
    "sparke",
    "sparke_callback",
]
