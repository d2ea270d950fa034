"""What the denoiser was called with: `_Capture` (a forward pre-hook), and the prompt
embeddings `sparke` takes from it (`capture_cond`), in the order of the package docstring."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cond import (
    DENOISERS,
    _collapse_repeats,
    _repeat_groups,
    class_label_cond,
    pool_prompt_embeds,
)

#: the token masks a denoiser may be called with, tried in this order
MASK_KWARGS = ("encoder_attention_mask", "encoder_hidden_states_mask")


class _Capture:
    """Forward pre-hook on the denoiser: keeps the conditioning of its first call per step."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] | None = None

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.seen is not None:
            return
        sample = (
            args[0]
            if args
            else next(
                (kwargs[k] for k in ("hidden_states", "sample") if kwargs.get(k) is not None), None
            )
        )
        added = kwargs.get("added_cond_kwargs") or {}
        mask_from = next(
            (k for k in MASK_KWARGS if isinstance(kwargs.get(k), torch.Tensor)),
            # QwenImage passes encoder_hidden_states_mask=None when no token is padding
            "encoder_hidden_states_mask" if "encoder_hidden_states_mask" in kwargs else None,
        )
        image = added.get("image_embeds")  # IP-Adapter passes a list here: not taken
        self.seen = {
            "rows": None if sample is None else int(sample.shape[0]),
            "class_labels": kwargs.get("class_labels"),
            "pooled": next(
                (
                    v
                    for v in (kwargs.get("pooled_projections"), added.get("text_embeds"))
                    if isinstance(v, torch.Tensor)
                ),
                None,
            ),
            "pooled_from": (
                "pooled_projections"
                if kwargs.get("pooled_projections") is not None
                else "added_cond_kwargs['text_embeds']"
            ),
            "tokens": kwargs.get("encoder_hidden_states"),
            "mask": kwargs.get(mask_from) if mask_from else None,
            "mask_from": mask_from,
            "image_embeds": (
                image if isinstance(image, torch.Tensor) and image.dim() == 2 else None
            ),
        }


def _prompt_of(params: Any, args: tuple, kwargs: dict) -> Any:
    """The call's ``prompt`` argument (keyword or positional), or None (``params``: the
    parameters of the pipeline's ``__call__``)."""
    if "prompt" in kwargs:
        return kwargs["prompt"]
    names = [n for n in params if n != "self"]
    i = names.index("prompt") if "prompt" in names else len(args)
    return args[i] if i < len(args) else None


def _tokenizer_mask(
    pipe: Any, prompt: Any, tokens: torch.Tensor, batch_size: int
) -> torch.Tensor | None:
    """The padding mask of ``prompt`` from the pipeline tokenizer whose encoder made ``tokens``.

    Rows follow diffusers' layout: each prompt repeated ``num_images_per_prompt`` times in a row,
    then (classifier-free guidance) the same mask for the negative half, which is not used.
    Tokens past the tokenizer's ``model_max_length`` are not the prompt's (Stable Audio appends
    its start/end-seconds embeddings to the text tokens): they count as padding.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        return None
    rows, length, width = tokens.shape
    for suffix in ("_3", "_2", ""):
        tok = getattr(pipe, "tokenizer" + suffix, None)
        enc = getattr(pipe, "text_encoder" + suffix, None)
        hidden = getattr(getattr(enc, "config", None), "hidden_size", None) or getattr(
            getattr(enc, "config", None), "d_model", None
        )
        if tok is None or hidden != width:
            continue
        n = min(length, getattr(tok, "model_max_length", None) or length)
        m = tok(prompt, padding="max_length", max_length=n, truncation=True)
        m = torch.as_tensor(m["attention_mask"], device=tokens.device)
        if m.shape[1] != n:
            continue
        m = torch.nn.functional.pad(m, (0, length - n))
        per, extra = divmod(batch_size, m.shape[0])
        if per < 1 or extra or rows not in (batch_size, 2 * batch_size):
            return None
        m = m.repeat_interleave(per, dim=0)
        return m if rows == batch_size else torch.cat([m, m])
    return None


def undouble(latents: torch.Tensor, capture: _Capture) -> tuple[torch.Tensor, bool]:
    """[z, z] stepped under DiT-style CFG (identical halves, differing conditioning)."""
    r = latents.shape[0]
    seen = capture.seen or {}
    c = seen.get("class_labels")
    c = seen.get("tokens") if c is None else c
    if r % 2 or not isinstance(c, torch.Tensor) or c.shape[0] != r:
        return latents, False
    h = r // 2
    if torch.equal(latents[:h], latents[h:]) and not torch.equal(c[:h], c[h:]):
        return latents[:h], True
    return latents, False


def auto_capture(guidance: Any) -> bool:
    """Whether an automatic ``sigma_cond`` (None) may still turn prompt-aware on captured
    prompts: its bank is empty or already holds prompt embeddings. A bank holding rows committed
    without prompts keeps the guidance unconditional (prompts cannot be added to it later)."""
    return guidance.sigma_cond is None and (
        len(guidance.bank) == 0 or guidance.bank.cond is not None
    )


def has_prompt_cond(capture: _Capture) -> bool:
    """Whether the denoiser's last call carried conditioning that `capture_cond` can take:
    class labels, a 2-D pooled embedding, token embeddings or a 2-D ``image_embeds``.

    False for an unconditional pipeline (DDPM, DDIM, LDM: the UNet gets the sample and the
    timestep only) and before the denoiser's first call.
    """
    seen = capture.seen
    if seen is None:
        return False
    pooled = seen["pooled"]
    return (
        seen["class_labels"] is not None
        or (pooled is not None and pooled.dim() == 2)
        or isinstance(seen["tokens"], torch.Tensor)
        or seen["image_embeds"] is not None
    )


def capture_cond(
    pipe: Any,
    capture: _Capture,
    b: int,
    last: torch.Tensor | None,
    prompt: Any,
    note: Callable[[str], None],
) -> torch.Tensor:
    """The prompt embeddings (b, m) of this step from what the denoiser was called with.

    Args:
        pipe: the pipeline. capture: its denoiser's `_Capture`. b: the number of latents.
        last: the embeddings of the previous step (kept when the denoiser was not called since).
        prompt: the call's ``prompt`` argument (for the tokenizer mask), or None.
        note: told where the embeddings come from (see `SparkeSession.cond_source`) once that
            is known, before they are pooled (not told when they are the previous step's).

    Returns:
        The embeddings.

    Raises:
        ValueError: no embeddings to be found, or none that match the b latents.
    """
    seen = capture.seen
    if seen is None:  # no denoiser call since the last step: keep the last embeddings
        if last is not None:
            return last
        raise ValueError(
            f"sparke found no prompt embeddings for {type(pipe).__name__}: its denoiser "
            f"({' / '.join('pipe.' + n for n in DENOISERS)}) was not called with "
            "encoder_hidden_states, pooled embeddings or class_labels; pass cond=(b, m) to "
            "sparke"
        )
    cfg = getattr(pipe, "do_classifier_free_guidance", None)
    cfg = None if cfg is None else bool(cfg)
    if seen["class_labels"] is not None:
        denoiser = next(getattr(pipe, n) for n in DENOISERS if hasattr(pipe, n))
        n = getattr(denoiser.config, "num_embeds_ada_norm", None) or getattr(
            denoiser.config, "num_class_embeds", None
        )
        if n is None:
            raise ValueError(
                "sparke: the denoiser takes class_labels but its config names no class "
                "count (num_embeds_ada_norm / num_class_embeds); pass cond=(b, m) to sparke"
            )
        note("class_labels")
        return class_label_cond(seen["class_labels"], b, int(n))
    if seen["pooled"] is not None and seen["pooled"].dim() == 2:
        note(seen["pooled_from"])
        return pool_prompt_embeds(seen["pooled"], b, cfg)
    tokens = seen["tokens"]
    if not isinstance(tokens, torch.Tensor):
        if seen["image_embeds"] is not None:  # Kandinsky 2.2's decoders: the only conditioning
            note("added_cond_kwargs['image_embeds']")
            return pool_prompt_embeds(seen["image_embeds"], b, cfg)
        raise ValueError(
            f"sparke found no prompt embeddings for {type(pipe).__name__} (its denoiser got "
            "no encoder_hidden_states, pooled or image embeddings or class_labels); pass "
            "cond=(b, m)"
        )
    mask, how = seen["mask"], seen["mask_from"]
    if mask is not None and mask.shape != tokens.shape[:2]:
        mask, how = None, None
    # one copy per frame (AnimateDiff): one row per sample of the denoiser's batch
    g = _repeat_groups(tokens, b, cfg, seen["rows"])
    tokens = _collapse_repeats(tokens, g)
    mask = None if mask is None else _collapse_repeats(mask, g)
    if how is None:
        mask, how = _tokenizer_mask(pipe, prompt, tokens, b), "tokenizer mask"
    if mask is None and how != "encoder_hidden_states_mask":
        how = "all tokens"
    note(f"encoder_hidden_states ({how})")
    return pool_prompt_embeds(tokens, b, cfg, mask=mask)
