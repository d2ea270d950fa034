"""Tiny random-weight diffusers pipelines, built locally (nothing is downloaded).

For the tests and the documentation examples of `rkekernels.adapters.diffusers.sparke`: each
pipeline has the real diffusers classes with the smallest configurations that run (a few
thousand parameters, 8x8 latents, text encoders of width 32 with 8 tokens), and tokenizers built
from a word-level vocabulary (the configurations: `rkekernels.adapters._tiny_models`). Outputs
are noise; the point is the data flow.

    pipe = tiny_pipeline("sd15")
    pipe(**tiny_call_kwargs("sd15", cfg=True, seed=0))
    run = tiny_guided_run("sd15", "b")  # two calls inside sparke, then one unguided

Names: see `TINY_PIPELINES`. Needs diffusers and transformers (the ``diffusers`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from ..sampling import DiversityGuidance
from . import encoders
from ._tiny_models import _BUILDERS, TOKENS, WIDTH, _clip_vision, tiny_tokenizer

__all__ = [
    "TINY_PIPELINES",
    "TinyRun",
    "tiny_call_kwargs",
    "tiny_clip_encoder",
    "tiny_guided_run",
    "tiny_image_embeds",
    "tiny_output",
    "tiny_pipeline",
    "tiny_tokenizer",
]

#: name -> diffusers pipeline class name
TINY_PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "controlnet": "StableDiffusionControlNetPipeline",
    "controlnet_sdxl": "StableDiffusionXLControlNetPipeline",
    "pixart_sigma": "PixArtSigmaPipeline",
    "pixart_alpha": "PixArtAlphaPipeline",
    "dit": "DiTPipeline",
    "kandinsky3": "Kandinsky3Pipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "cogvideox": "CogVideoXPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "animatediff": "AnimateDiffPipeline",
    "kandinsky22": "KandinskyV22Pipeline",
    "qwenimage": "QwenImagePipeline",
    "stable_audio": "StableAudioPipeline",
}


def _build(name: str) -> Any:
    import diffusers as d

    torch.manual_seed(0)
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline {name!r}; known: {sorted(TINY_PIPELINES)}")
    return _BUILDERS[name](d, name)


@cache
def tiny_pipeline(name: str) -> Any:
    """The tiny pipeline ``name`` (one of `TINY_PIPELINES`), built once per process.

    Random weights from ``torch.manual_seed(0)``; progress bars off.

    Example:
        >>> from rkekernels.adapters._tiny import tiny_pipeline
        >>> type(tiny_pipeline("dit")).__name__
        'DiTPipeline'
    """
    pipe = _build(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@cache
def tiny_clip_encoder() -> Any:
    """A CLIP image encoder (`rkekernels.adapters.encoders.load_encoder`) on a random-weight
    ``CLIPVisionModelWithProjection`` (16 x 16 input, 2 layers, width 32, D = 32)."""
    torch.manual_seed(0)
    return encoders.load_encoder("clip", model=_clip_vision())


def tiny_image_embeds(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (image_embeds, negative_image_embeds), each (b, 32), for ``kandinsky22``
    (standing in for its prior's output; the same for every seed of `tiny_call_kwargs`).

    Example:
        >>> from rkekernels.adapters._tiny import tiny_image_embeds
        >>> [tuple(e.shape) for e in tiny_image_embeds(2)]
        [(2, 32), (2, 32)]
    """
    g = torch.Generator().manual_seed(1234)
    return torch.randn(b, WIDTH, generator=g), torch.randn(b, WIDTH, generator=g)


def tiny_call_kwargs(
    name: str, *, cfg: bool = False, seed: int = 0, prompts: Any = None, steps: int = 2
) -> dict[str, Any]:
    """Keyword arguments for one call of ``tiny_pipeline(name)``: 2 images, ``steps`` steps.

    ``cfg`` turns classifier-free guidance on (Flux: true CFG with a negative prompt; DiT:
    guidance_scale 4). Latents are returned (``output_type="latent"``); override it to decode.
    """
    g = torch.Generator().manual_seed(seed)
    if prompts is None:
        prompts = ["a photo of a dog", "a red car in the snow"]
    kw: dict[str, Any] = dict(num_inference_steps=steps, generator=g, output_type="latent")
    if name == "dit":
        kw.update(class_labels=[1, 2], guidance_scale=4.0 if cfg else 1.0, output_type="np")
        return kw
    if name == "kandinsky22":  # prompt-free: the prior's image embeddings (fixed here)
        emb, neg = tiny_image_embeds(len(prompts))
        kw.update(image_embeds=emb, negative_image_embeds=neg, height=16, width=16)
        kw["guidance_scale"] = 4.0 if cfg else 1.0
        return kw
    kw["prompt"] = list(prompts)
    scale = 5.0 if cfg else 1.0
    if name == "flux":
        kw.update(height=8, width=8, max_sequence_length=TOKENS, guidance_scale=3.5)
        if cfg:
            kw.update(negative_prompt=["bad quality"] * len(prompts), true_cfg_scale=2.0)
        return kw
    kw["guidance_scale"] = scale
    if name in ("pixart_sigma", "pixart_alpha"):
        kw.update(height=16, width=16, max_sequence_length=TOKENS)
        kw.update(use_resolution_binning=False, clean_caption=False)
    elif name == "sd3":
        kw.update(height=8, width=8, max_sequence_length=TOKENS)
    elif name == "kandinsky3":  # the pipeline downscales by 8 whatever the movq
        kw.update(height=16, width=16)
    elif name == "cogvideox":
        kw.update(height=16, width=16, num_frames=5, max_sequence_length=TOKENS)
    elif name == "animatediff":
        kw.update(height=16, width=16, num_frames=3)
    elif name == "qwenimage":  # true CFG with a negative prompt, as Flux
        # no shorter than the template's end (its padding mask then matters)
        kw.update(height=16, width=16, max_sequence_length=4 * TOKENS, true_cfg_scale=scale)
        del kw["guidance_scale"]
        if cfg:
            kw["negative_prompt"] = ["bad quality"] * len(prompts)
    elif name == "stable_audio":  # 4 latent frames of the tiny DiT: 2 s at 4 Hz
        kw["audio_end_in_s"] = 2.0
    else:
        kw.update(height=16, width=16)
    if name.startswith("controlnet"):
        kw["image"] = torch.zeros(len(prompts), 3, 16, 16)
    elif name in ("img2img", "inpaint"):  # strength 1: both steps run
        kw.update(image=torch.full((len(prompts), 3, 16, 16), 0.5), strength=1.0)
        if name == "inpaint":
            kw["mask_image"] = torch.ones(len(prompts), 1, 16, 16)
    return kw


def tiny_output(out: Any) -> torch.Tensor:
    """What a call of a tiny pipeline returned, as a float tensor: its ``frames``, ``audios`` or
    ``images`` (the final latents under ``output_type="latent"``; DiT's decoded images)."""
    x = next(getattr(out, k) for k in ("frames", "audios", "images") if hasattr(out, k))
    return torch.as_tensor(x).float()


@dataclass
class TinyRun:
    """What `tiny_guided_run` saw.

    Attributes:
        guide: the `DiversityGuidance` (its bank holds every guided sample).
        session: the `sparke` session (``.route``, ``.cond_source``, ...), closed.
        outputs: `tiny_output` of each guided call (seeds 0, 1, ...).
        banks, steps: the bank size and the session's step count after each guided call.
        plain: the last call again, unguided (same seed).
    """

    guide: DiversityGuidance
    session: Any
    outputs: list[torch.Tensor]
    banks: list[int]
    steps: list[int]
    plain: torch.Tensor


def tiny_guided_run(name: str, mode: str, calls: int = 2) -> TinyRun:
    """``calls`` calls of ``tiny_pipeline(name)`` inside ``sparke``, then the last one unguided.

    Modes: "a" unconditional guidance (``sigma_cond=math.inf``: prompts ignored), "b" the
    default automatic ``sigma_cond=None`` (prompt-aware from the pipeline's own prompt
    embeddings, as ``DiversityGuidance()`` is), "c" ``sigma_cond=0.5`` with classifier-free
    guidance. The guidance has ``scale=0.2`` (the default is 0.1) so that its change shows
    after 2 steps; the calls are `tiny_call_kwargs` with seeds 0, 1, ...

    Example:
        >>> from rkekernels.adapters._tiny import tiny_guided_run
        >>> run = tiny_guided_run("dit", "a")
        >>> run.banks, run.session.route
        ([2, 4], 'scheduler.step')
    """
    from .diffusers import sparke

    if mode not in ("a", "b", "c"):
        raise ValueError(f"mode must be 'a', 'b' or 'c', got {mode!r}")
    pipe = tiny_pipeline(name)
    cfg = mode == "c"
    sigma_cond = {"a": math.inf, "b": None, "c": 0.5}[mode]
    guide = DiversityGuidance(1.0, sigma_cond=sigma_cond, scale=0.2)
    outputs, banks, steps = [], [], []
    with sparke(pipe, guide) as session:
        for seed in range(calls):
            outputs.append(tiny_output(pipe(**tiny_call_kwargs(name, cfg=cfg, seed=seed))))
            banks.append(len(guide.bank))
            steps.append(session.steps)
    plain = tiny_output(pipe(**tiny_call_kwargs(name, cfg=cfg, seed=calls - 1)))
    return TinyRun(guide, session, outputs, banks, steps, plain)
