"""Guidance features of decoded images: the x0 prediction of each step, decoded and encoded."""

from __future__ import annotations

from typing import Any

import torch


def _x0_prediction(scheduler: Any, args: tuple, kwargs: dict, out: Any) -> torch.Tensor | None:
    """The scheduler step's prediction of the clean latents, where it gives or implies one.

    ``pred_original_sample`` (DDIM, DDPM, Euler, ...: the second entry of the tuple with
    ``return_dict=False``); flow matching: ``x0 = sample - sigma_t * model_output``.
    """
    x0 = getattr(out, "pred_original_sample", None)
    if x0 is None and isinstance(out, tuple) and len(out) > 1:
        x0 = out[1] if isinstance(out[1], torch.Tensor) and out[1].shape == out[0].shape else None
    if x0 is None and "FlowMatch" in type(scheduler).__name__:
        model_output = args[0] if args else kwargs.get("model_output")
        sample = args[2] if len(args) > 2 else kwargs.get("sample")
        index = getattr(scheduler, "step_index", None)
        if isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor) and index:
            sigma = scheduler.sigmas[index - 1].to(sample.device, torch.float32)
            x0 = sample.float() - sigma * model_output.float()
    return None if x0 is None else x0.detach()


def _image_size(pipe: Any, args: tuple, kwargs: dict, params: Any) -> tuple[int, int] | None:
    names = [n for n in params if n != "self"]

    def arg(name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = names.index(name) if name in names else len(args)
        return args[i] if i < len(args) else None

    h, w = arg("height"), arg("width")
    if h is None or w is None:
        base = getattr(pipe, "default_sample_size", None)
        scale = getattr(pipe, "vae_scale_factor", None)
        if base is None or scale is None:
            return None
        h, w = h or base * scale, w or base * scale
    return int(h), int(w)


def decode_latents(
    pipe: Any, latents: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Differentiable decode of a pipeline's latents to images (b', 3, H, W) in [-1, 1].

    What the pipeline does before its image post-processing, with autograd left on:
    ``vae.decode(z / scaling_factor + shift_factor)`` (SD 1.5/2.x, SDXL, ControlNet, PixArt,
    DiT, SD3 with its shift); Flux's packed (b, tokens, c) latents are unpacked first (``size``:
    the image (height, width)); Kandinsky 3 decodes with ``movq``; video latents
    (b, frames, c, h, w) (CogVideoX) give b * frames images, frame-major per sample.

    Raises:
        ValueError: a pipeline without ``vae`` or ``movq``, or packed latents without ``size``.

    Example:
        >>> import torch
        >>> from rkekernels.adapters._tiny import tiny_pipeline
        >>> from rkekernels.adapters.diffusers import decode_latents
        >>> tuple(decode_latents(tiny_pipeline("dit"), torch.zeros(2, 4, 8, 8)).shape)
        (2, 3, 16, 16)
    """
    movq = getattr(pipe, "movq", None)
    if movq is not None:
        return movq.decode(latents, force_not_quantize=True).sample
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ValueError(f"{type(pipe).__name__} has no vae (or movq) to decode its latents")
    z = latents.to(vae.dtype)
    if z.dim() == 3:  # Flux-style packed sequence latents
        if size is None or not hasattr(pipe, "_unpack_latents"):
            raise ValueError(
                "packed (b, tokens, c) latents need the image size to be unpacked: pass "
                "size=(height, width)"
            )
        z = pipe._unpack_latents(z, size[0], size[1], pipe.vae_scale_factor)
    scaling = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    if z.dim() == 5:  # video (b, frames, c, h, w) -> decode (b, c, frames, h, w)
        frames = vae.decode(z.permute(0, 2, 1, 3, 4) / scaling).sample  # (b, 3, f, H, W)
        return frames.permute(0, 2, 1, 3, 4).reshape(-1, frames.shape[1], *frames.shape[-2:])
    return vae.decode(z / scaling + shift).sample


class DecodedFeatures:
    """A ``feature_fn`` for `DiversityGuidance`: image-encoder features of the decoded prediction.

    ``features(z) = encoder(decode_latents(pipe, x0(z)))`` (b, D), reshaped to one row per
    sample (video: the frames' features side by side). Inside `sparke`, ``x0`` is the
    scheduler's prediction of the clean latents at the guided step (``pred_original_sample``,
    or ``sample - sigma * model_output`` for flow matching), entered as
    ``x0(z) = x0_hat + (z - z.detach())``: the value is the prediction's, the gradient flows to
    the latents as through the identity. `DiversityGuidance.grad` then takes one VJP through the
    encoder and the decoder back to the latents; the rescaled step divides any constant factor
    of dx0/dz out. Outside `sparke`, or where the scheduler gives no prediction, and at
    `DiversityGuidance.commit` (finished samples), the latents themselves are decoded. As in
    the official code's CLIP path, the bank then holds encoder features of the images.

    Attributes:
        pipe, encoder: as given to `decoded_features`.
        x0: the current x0 prediction (set by `sparke` for the duration of one guided step).
        size: the image (height, width) of the current call (for packed latents).
    """

    def __init__(self, pipe: Any, encoder: Any) -> None:
        if not callable(encoder):
            raise TypeError(f"encoder must be callable, got {type(encoder).__name__}")
        self.pipe, self.encoder = pipe, encoder
        self.x0: torch.Tensor | None = None
        self.size: tuple[int, int] | None = None

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        z, x0 = latents, self.x0
        if x0 is not None and x0.shape[0] == 2 * z.shape[0] and x0.shape[1:] == z.shape[1:]:
            x0 = x0[: z.shape[0]]  # DiT's doubled batch [x0, x0]
        if x0 is not None and x0.shape == z.shape:
            z = x0.to(z) + (z - z.detach())
        images = decode_latents(self.pipe, z, self.size)
        feats = self.encoder(images.float(), value_range=(-1.0, 1.0))
        return feats.reshape(latents.shape[0], -1)


def decoded_features(pipe: Any, encoder: Any) -> DecodedFeatures:
    """Encoder-feature guidance for a pipeline with a VAE: pass it as ``feature_fn``.

    ``encoder`` is an image encoder taking ``(b, 3, H, W)`` images with
    ``value_range=(-1, 1)``, e.g. ``rkekernels.adapters.encoders.load_encoder("clip")`` (a
    CLIP vision model from transformers; load real weights on your machine). See
    `DecodedFeatures`.

    Example:
        >>> import torch
        >>> from rkekernels import DiversityGuidance
        >>> from rkekernels.adapters._tiny import tiny_clip_encoder, tiny_pipeline
        >>> from rkekernels.adapters.diffusers import decoded_features, sparke
        >>> pipe = tiny_pipeline("dit")
        >>> guide = DiversityGuidance(1.0, scale=0.1,
        ...                           feature_fn=decoded_features(pipe, tiny_clip_encoder()))
        >>> with sparke(pipe, guide):
        ...     _ = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=1.0,
        ...              output_type="np", generator=torch.Generator().manual_seed(0))
        >>> guide.bank.features.shape                 # CLIP features of the decoded images
        torch.Size([2, 32])
    """
    return DecodedFeatures(pipe, encoder)
