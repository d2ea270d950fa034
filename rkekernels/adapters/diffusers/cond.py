"""The prompt embeddings of the diffusers adapters: pooling, class labels, fixed ``cond``.

Shared by `rkekernels.adapters.diffusers.sparke` (through its capture of the denoiser's inputs)
and `rkekernels.adapters.diffusers.sparke_callback` (from the callback arguments).
"""

from __future__ import annotations

from typing import Any

import torch

#: Names of the denoiser component, tried in this order.
DENOISERS = ("transformer", "unet")
#: Pooled text embeddings a callback may receive (preferred over token embeddings).
POOLED_INPUTS = ("pooled_prompt_embeds", "add_text_embeds")
#: Token masks a callback may receive alongside ``prompt_embeds``.
MASK_INPUTS = ("prompt_attention_mask", "attention_mask")


class SparkeError(RuntimeError):
    """A guided pipeline call that SPARKE could not reach (the message says why and what to do)."""


def _blocks_equal(x: torch.Tensor, groups: int) -> bool:
    """Whether x's rows are ``groups`` consecutive blocks of r > 1 equal rows each."""
    rows = x.shape[0]
    if groups < 1 or rows % groups or rows == groups:
        return False
    y = x.reshape(groups, rows // groups, *x.shape[1:])
    return torch.equal(y, y[:, :1].expand_as(y))


def _repeat_groups(
    x: torch.Tensor, batch_size: int, cfg: bool | None, groups: int | None = None
) -> int | None:
    """The row count x collapses to when its rows are copies repeated in consecutive blocks.

    AnimateDiff repeats each prompt embedding once per frame (``repeat_interleave``): b * frames
    rows, 2 * b * frames under classifier-free guidance. Returns g when the rows are g blocks of
    equal rows, where g is ``groups`` (the denoiser's batch, when known), else b or 2b as
    ``cfg`` says (both tried when it is None: exactly one must fit); None when x already has b
    or 2b rows, or no (single) g fits.
    """
    rows = x.shape[0]
    if rows in (batch_size, 2 * batch_size):
        return None
    if groups is not None:
        candidates = [groups]
    elif cfg is None:
        candidates = [batch_size, 2 * batch_size]
    else:
        candidates = [2 * batch_size if cfg else batch_size]
    fits = [g for g in candidates if _blocks_equal(x, g)]
    return fits[0] if len(fits) == 1 else None


def _collapse_repeats(x: torch.Tensor, groups: int | None) -> torch.Tensor:
    """The first row of each of ``groups`` consecutive blocks of x (x itself for None)."""
    if groups is None:
        return x
    return x.reshape(groups, x.shape[0] // groups, *x.shape[1:])[:, 0]


def _conditional_half(
    x: torch.Tensor, batch_size: int, cfg: bool | None, what: str
) -> torch.Tensor:
    rows = x.shape[0]
    if rows == batch_size:
        return x
    if rows == 2 * batch_size and cfg is not False:
        return x[batch_size:]
    raise ValueError(
        f"cannot match {what} ({rows} rows) to {batch_size} latents (classifier-free guidance: "
        f"{cfg}); pass cond=(b, m) embeddings to sparke / sparke_callback"
    )


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def pool_prompt_embeds(
    prompt_embeds: torch.Tensor,
    batch_size: int,
    cfg: bool | None = None,
    *,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """One prompt embedding per image from a pipeline's ``prompt_embeds``.

    Token embeddings e (rows, tokens, m) are averaged over the tokens that the mask keeps,
    ``sum_t mask[r, t] e[r, t] / sum_t mask[r, t]`` (all tokens without a mask; a row whose mask
    is all zero gives zero); (rows, m) embeddings (pooled ones) are kept. Rows are matched to
    the b latents by their count: b rows are used as they are, 2b rows come from classifier-free
    guidance and the second (conditional) half is used, as diffusers concatenates
    ``[negative, positive]``. Rows repeated in consecutive equal blocks (AnimateDiff's one copy
    per frame, b * frames or 2b * frames rows) are first collapsed to one row per block, and
    the mask with them. With ``normalize`` each row is divided by its L2
    norm (a zero row stays zero).

    Args:
        prompt_embeds: (rows, tokens, m) or (rows, m) embeddings from the pipeline.
        batch_size: b, the number of latents being generated.
        cfg: the pipeline's ``do_classifier_free_guidance`` where it has one; None: decide by
            the row count alone. ``False`` with 2b rows is an error.
        mask: (rows, tokens) attention mask (1 = token, 0 = padding), or None.
        normalize: return unit vectors (default).

    Returns:
        (b, m) float32 tensor on prompt_embeds' device.

    Raises:
        ValueError: a row count that matches neither b nor 2b (pass ``cond`` explicitly then),
            a mask of another shape, embeddings that are neither 2-D nor 3-D.

    Example:
        >>> import torch
        >>> from rkekernels.adapters.diffusers import pool_prompt_embeds
        >>> neg, pos = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
        >>> pool_prompt_embeds(torch.cat([neg, pos]), batch_size=2)      # the positive half
        tensor([[0.5000, 0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000, 0.5000]])
        >>> e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])       # last token: padding
        >>> pool_prompt_embeds(e, 1, mask=torch.tensor([[1, 1, 0]]), normalize=False)
        tensor([[0.5000, 0.5000]])
    """
    pe = prompt_embeds
    if pe.dim() not in (2, 3):
        raise ValueError(
            f"prompt_embeds must be (rows, tokens, m) or (rows, m); got shape {tuple(pe.shape)}"
        )
    if pe.dim() == 3 and mask is not None and mask.shape != pe.shape[:2]:
        raise ValueError(
            f"mask must be (rows, tokens) = {tuple(pe.shape[:2])}, got {tuple(mask.shape)}"
        )
    g = _repeat_groups(pe, batch_size, cfg)  # per-frame copies (AnimateDiff): one row each
    pe = _conditional_half(_collapse_repeats(pe, g), batch_size, cfg, "prompt_embeds").float()
    if pe.dim() == 3:
        if mask is None:
            pe = pe.mean(dim=1)
        else:
            m = _conditional_half(_collapse_repeats(mask, g), batch_size, cfg, "mask").to(pe)
            pe = (pe * m[..., None]).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return _unit(pe) if normalize else pe


def class_label_cond(
    class_labels: torch.Tensor, batch_size: int, num_classes: int, *, null_label: int | None = None
) -> torch.Tensor:
    """One-hot prompt embeddings ``one_hot(label, num_classes)`` (b, num_classes) from class labels.

    With 2b labels (classifier-free guidance) the half that is not all ``null_label``
    (default ``num_classes``, DiT's unconditional class) is used; DiT concatenates
    ``[labels, null]``.

    Example:
        >>> import torch
        >>> from rkekernels.adapters.diffusers import class_label_cond
        >>> class_label_cond(torch.tensor([2, 0, 3, 3]), 2, num_classes=3, null_label=3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    labels = class_labels.reshape(-1).long()
    null = num_classes if null_label is None else null_label
    if labels.shape[0] == 2 * batch_size:
        first, second = labels[:batch_size], labels[batch_size:]
        labels = second if bool((first == null).all()) else first
    elif labels.shape[0] != batch_size:
        raise ValueError(
            f"cannot match class_labels ({labels.shape[0]} rows) to {batch_size} latents; "
            "pass cond=(b, m) embeddings to sparke"
        )
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"class labels must be in [0, {num_classes}), got {labels.tolist()}")
    return torch.nn.functional.one_hot(labels, num_classes).float()


def _fixed_cond(cond: Any) -> torch.Tensor | None:
    if cond is None:
        return None
    cond = cond if isinstance(cond, torch.Tensor) else torch.as_tensor(cond)
    return cond.float().mean(dim=1) if cond.dim() == 3 else cond
