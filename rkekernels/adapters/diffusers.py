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

Prompt embeddings for conditional guidance (``guidance.sigma_cond`` set), in this order:

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
   Kandinsky 3), else the attention mask of the pipeline's tokenizer applied to the call's
   ``prompt`` (SD 1.5/2.x, ControlNet SD, CogVideoX), else (``prompt_embeds`` passed without a
   prompt) all tokens.

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
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
except ImportError as exc:  # pragma: no cover - exercised by a test with diffusers hidden
    raise ImportError(
        "rkekernels.adapters.diffusers needs the diffusers package: install it with "
        "`pip install diffusers` (or `pip install rkekernels[diffusers]`)"
    ) from exc

from ..sampling import DiversityGuidance
from ._checks import check_adapter_guidance

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

#: Names of the denoiser component, tried in this order.
DENOISERS = ("transformer", "unet")
#: Pooled text embeddings a callback may receive (preferred over token embeddings).
POOLED_INPUTS = ("pooled_prompt_embeds", "add_text_embeds")
#: Token masks a callback may receive alongside ``prompt_embeds``.
MASK_INPUTS = ("prompt_attention_mask", "attention_mask")


class SparkeError(RuntimeError):
    """A guided pipeline call that SPARKE could not reach (the message says why and what to do)."""


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
    ``[negative, positive]``. With ``normalize`` each row is divided by its L2 norm (a zero row
    stays zero).

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
    pe = _conditional_half(pe, batch_size, cfg, "prompt_embeds").float()
    if pe.dim() == 3:
        if mask is None:
            pe = pe.mean(dim=1)
        else:
            if mask.shape != prompt_embeds.shape[:2]:
                raise ValueError(
                    f"mask must be (rows, tokens) = {tuple(prompt_embeds.shape[:2])}, "
                    f"got {tuple(mask.shape)}"
                )
            m = _conditional_half(mask, batch_size, cfg, "mask").to(pe)
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


class SparkeCallback(PipelineCallback):
    """A diffusers `PipelineCallback` that applies a `DiversityGuidance` at every step end.

    Build it with `sparke_callback`. ``tensor_inputs`` is ``["latents"]``, plus
    ``"prompt_embeds"`` (or the ``pooled`` input) when the guidance is conditional and no
    ``cond`` was given.

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
    def tensor_inputs(self) -> list[str]:
        """The pipeline tensors this callback reads (and may return)."""
        if self.guidance.conditional and self.cond is None:
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
        if not self.guidance.conditional:
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

    Args:
        guidance: a `rkekernels.DiversityGuidance` (schedule, scale, bank).
        cond: prompt embeddings for conditional guidance: (b, m), (m,) (one for all images)
            or token embeddings (b, tokens, m), mean-pooled; used as given otherwise. None:
            when the guidance is conditional, taken at each step from the callback arguments
            (`pool_prompt_embeds`): a pooled ``pooled_prompt_embeds`` / ``add_text_embeds``
            where the pipeline hands one over, else ``prompt_embeds`` averaged over the tokens
            of its ``prompt_attention_mask`` / ``attention_mask`` (all tokens without one).
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
        ValueError: cond given for an unconditional guidance; at run time a tensor the pipeline
            did not hand over (the message names ``callback_on_step_end_tensor_inputs``) and
            the errors of `DiversityGuidance.apply`.

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
    return SparkeCallback(guidance, cond, normalize_cond=normalize_cond, pooled=pooled)


# ---------------------------------------------------------------------------------- sparke


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
            "mask": kwargs.get("encoder_attention_mask"),
        }


class SparkeSession:
    """What `sparke` yields: the guided pipeline, its guidance, and how the last call went.

    Attributes:
        pipe, guidance: as given to `sparke`.
        route: ``"callback_on_step_end"`` or ``"scheduler.step"``: how calls are guided.
        cond_source: where the last call's prompt embeddings came from (``"cond"``,
            ``"class_labels"``, ``"pooled_projections"``, ``"added_cond_kwargs['text_embeds']"``,
            ``"encoder_hidden_states (encoder_attention_mask)"``,
            ``"encoder_hidden_states (tokenizer mask)"``, ``"encoder_hidden_states (all tokens)"``),
            or None (unconditional).
        steps: how many steps the hook saw in the last call; calls: guided calls so far.
    """

    def __init__(self, pipe: Any, guidance: DiversityGuidance, cond: Any) -> None:
        self.pipe = pipe
        self.guidance = guidance
        self.cond = _fixed_cond(cond)
        self._call = type(pipe).__call__
        self._params = inspect.signature(self._call).parameters
        self.route = (
            "callback_on_step_end" if "callback_on_step_end" in self._params else "scheduler.step"
        )
        self.cond_source: str | None = None
        self.steps = 0
        self.calls = 0

    # ---------------------------------------------------------------- one pipeline call

    def run(self, pipe: Any, args: tuple, kwargs: dict) -> Any:
        name = type(pipe).__name__
        self.steps, self.cond_source = 0, None
        state = {
            "latents": None,
            "cond": None,
            "sched": 0,
            "x0": None,
            "prompt": _prompt_of(self, args, kwargs),
        }
        capture = _Capture()
        denoiser = next(
            (
                m
                for m in (getattr(pipe, n, None) for n in DENOISERS)
                if isinstance(m, torch.nn.Module)
            ),
            None,
        )
        handle = (
            None
            if denoiser is None
            else denoiser.register_forward_pre_hook(capture, with_kwargs=True)
        )
        scheduler = pipe.scheduler
        own_step = scheduler.__dict__.get("step")
        inner_step = scheduler.step

        def hook(latents: torch.Tensor, i: int, total: int) -> torch.Tensor:
            z, doubled = self._undouble(latents, capture)
            cond = self._cond(pipe, capture, z.shape[0], state)
            capture.seen = None
            decoded = self.guidance.feature_fn
            if isinstance(decoded, DecodedFeatures):  # the x0 prediction of this step
                decoded.x0 = state["x0"]
                decoded.size = _image_size(pipe, args, kwargs, self._params)
            try:
                out = self.guidance.apply(z, cond, progress=min(i / max(total, 1), 1.0), step=i)
            finally:
                if isinstance(decoded, DecodedFeatures):
                    decoded.x0 = None
            state["latents"], state["cond"] = out, cond
            self.steps += 1
            return torch.cat([out, out]) if doubled else out

        def step(*a: Any, **k: Any) -> Any:
            out = inner_step(*a, **k)
            i = state["sched"]
            state["sched"] += 1
            state["x0"] = _x0_prediction(scheduler, a, k, out)
            if self.route != "scheduler.step":
                return out
            total = len(scheduler.timesteps)
            if isinstance(out, tuple):
                return (hook(out[0], i, total), *out[1:])
            out.prev_sample = hook(out.prev_sample, i, total)
            return out

        if self.route == "callback_on_step_end":
            kwargs = dict(kwargs)
            user_cb = kwargs.pop("callback_on_step_end", None)
            inputs = kwargs.pop("callback_on_step_end_tensor_inputs", None)
            if inputs is None and isinstance(user_cb, PipelineCallback | MultiPipelineCallbacks):
                inputs = user_cb.tensor_inputs
            inputs = ["latents", *[k for k in (inputs or []) if k != "latents"]]

            def callback(p: Any, i: int, t: Any, cb_kwargs: dict) -> dict:
                if "latents" not in cb_kwargs:
                    raise SparkeError(
                        f"{name} did not hand 'latents' to callback_on_step_end although "
                        "callback_on_step_end_tensor_inputs lists it; guide this pipeline's "
                        "loop by hand (guidance.apply / guidance.commit)"
                    )
                cb_kwargs["latents"] = hook(cb_kwargs["latents"], i, int(p.num_timesteps))
                return cb_kwargs if user_cb is None else user_cb(p, i, t, cb_kwargs)

            kwargs["callback_on_step_end"] = callback
            if "callback_on_step_end_tensor_inputs" in self._params:
                kwargs["callback_on_step_end_tensor_inputs"] = inputs

        scheduler.step = step
        committed = False
        try:
            out = self._call(pipe, *args, **kwargs)
            if self.steps == 0:
                raise SparkeError(self._never_reached(name, state["sched"]))
            self.guidance.commit(state["latents"], state["cond"])
            committed = True
            self.calls += 1
            return out
        finally:
            if handle is not None:
                handle.remove()
            if own_step is None:
                scheduler.__dict__.pop("step", None)
            else:
                scheduler.step = own_step
            if not committed:
                self.guidance.reset()

    def _never_reached(self, name: str, sched_steps: int) -> str:
        if self.route == "callback_on_step_end":
            why = (
                f"{name}.__call__ accepts callback_on_step_end but never called it "
                f"(pipe.scheduler.step ran {sched_steps} times)"
            )
        else:
            why = (
                f"{name}.__call__ has no callback_on_step_end and never called "
                "pipe.scheduler.step (its loop steps another object)"
            )
        return (
            f"SPARKE guidance never ran during this {name} call: {why}, so the latents were "
            "not guided and nothing was committed to guidance.bank. Fix: guide the loop "
            "yourself (guidance.apply(latents, cond, progress=i / N) after each step, then "
            "guidance.commit(latents, cond)), or report the pipeline to rkekernels."
        )

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _undouble(latents: torch.Tensor, capture: _Capture) -> tuple[torch.Tensor, bool]:
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

    def _cond(self, pipe: Any, capture: _Capture, b: int, state: dict) -> torch.Tensor | None:
        g = self.guidance
        if self.cond is not None and g.sigma_cond != math.inf:
            self.cond_source = "cond"  # sigma_cond=None: conditional from here on
            return self.cond
        if not g.conditional:
            return None
        seen = capture.seen
        if seen is None:  # no denoiser call since the last step: keep the last embeddings
            if state["cond"] is not None:
                return state["cond"]
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
            self.cond_source = "class_labels"
            return class_label_cond(seen["class_labels"], b, int(n))
        if seen["pooled"] is not None and seen["pooled"].dim() == 2:
            self.cond_source = seen["pooled_from"]
            return pool_prompt_embeds(seen["pooled"], b, cfg)
        tokens = seen["tokens"]
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(
                f"sparke found no prompt embeddings for {type(pipe).__name__} (its denoiser got "
                "no encoder_hidden_states, pooled embeddings or class_labels); pass cond=(b, m)"
            )
        mask, how = seen["mask"], "encoder_attention_mask"
        if not (isinstance(mask, torch.Tensor) and mask.shape == tokens.shape[:2]):
            mask, how = _tokenizer_mask(pipe, state["prompt"], tokens, b), "tokenizer mask"
        if mask is None:
            how = "all tokens"
        self.cond_source = f"encoder_hidden_states ({how})"
        return pool_prompt_embeds(tokens, b, cfg, mask=mask)


def _prompt_of(session: SparkeSession, args: tuple, kwargs: dict) -> Any:
    """The call's ``prompt`` argument (keyword or positional), or None."""
    if "prompt" in kwargs:
        return kwargs["prompt"]
    names = [n for n in session._params if n != "self"]
    i = names.index("prompt") if "prompt" in names else len(args)
    return args[i] if i < len(args) else None


def _tokenizer_mask(
    pipe: Any, prompt: Any, tokens: torch.Tensor, batch_size: int
) -> torch.Tensor | None:
    """The padding mask of ``prompt`` from the pipeline tokenizer whose encoder made ``tokens``.

    Rows follow diffusers' layout: each prompt repeated ``num_images_per_prompt`` times in a row,
    then (classifier-free guidance) the same mask for the negative half, which is not used.
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
        m = tok(prompt, padding="max_length", max_length=length, truncation=True)
        m = torch.as_tensor(m["attention_mask"], device=tokens.device)
        if m.shape[1] != length:
            continue
        per, extra = divmod(batch_size, m.shape[0])
        if per < 1 or extra or rows not in (batch_size, 2 * batch_size):
            return None
        m = m.repeat_interleave(per, dim=0)
        return m if rows == batch_size else torch.cat([m, m])
    return None


_GUIDED = "_rkekernels_sparke_session"


@contextmanager
def sparke(pipe: Any, guidance: DiversityGuidance, *, cond: Any = None) -> Iterator[SparkeSession]:
    """Guide every call of a diffusers pipeline with SPARKE inside a ``with`` block.

    Inside the block each ``pipe(...)`` call runs with `DiversityGuidance.apply` after every
    scheduler step (through ``callback_on_step_end`` where the pipeline has it, else through a
    wrapper of ``pipe.scheduler.step``) and commits its final latents (and their ``cond``) to
    ``guidance.bank``: b images per call, pushed away from every earlier one. The pipeline is
    not forked; its class, scheduler and denoiser are restored on exit, also after an exception.
    Where ``cond`` comes from when the guidance is conditional: see the module docstring (the
    pipeline's pooled embedding, else a mask-aware mean of its token embeddings, else DiT's
    class labels as one-hot vectors).

    Args:
        pipe: a diffusers pipeline (any ``DiffusionPipeline`` with a ``scheduler``).
        guidance: a `rkekernels.DiversityGuidance` (bandwidths, scale, schedule, bank).
        cond: fixed prompt embeddings (b, m), (m,) or (b, tokens, m) (mean-pooled) for every
            call; None: taken from each call (conditional guidance) or not used.

    Yields:
        A `SparkeSession` (``.route``, ``.cond_source``, ``.steps``, ``.calls``).

    Raises:
        TypeError: guidance is not a DiversityGuidance; pipe has no scheduler.
        ValueError: cond given for an unconditional guidance; the pipe is already inside
            `sparke`; at run time, prompt embeddings that cannot be matched to the latents.
        SparkeError: a call during which the guidance never ran (the message says why).

    Example:
        >>> import torch
        >>> from rkekernels import DiversityGuidance
        >>> from rkekernels.adapters._tiny import tiny_pipeline
        >>> from rkekernels.adapters.diffusers import sparke
        >>> pipe = tiny_pipeline("dit")                       # random weights, 8x8 latents
        >>> guide = DiversityGuidance(sigma=1.0, sigma_cond=0.5, scale=0.1)
        >>> with sparke(pipe, guide) as session:
        ...     for seed in range(2):
        ...         _ = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="latent",
        ...                  generator=torch.Generator().manual_seed(seed))
        >>> len(guide.bank), session.route, session.cond_source
        (4, 'scheduler.step', 'class_labels')
        >>> type(pipe).__name__, "step" in vars(pipe.scheduler)   # restored
        ('DiTPipeline', False)
    """
    check_adapter_guidance(guidance, cond)
    if getattr(type(pipe), _GUIDED, None) is not None:
        raise ValueError("this pipeline is already inside sparke(...): nest no second one")
    if getattr(pipe, "scheduler", None) is None or not callable(
        getattr(pipe.scheduler, "step", None)
    ):
        raise TypeError(
            f"pipe must be a diffusers pipeline with a scheduler, got {type(pipe).__name__}"
        )
    session = SparkeSession(pipe, guidance, cond)
    original = type(pipe)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return session.run(self, args, kwargs)

    guided = type(
        original.__name__,
        (original,),
        {"__call__": __call__, _GUIDED: session, "__module__": original.__module__},
    )
    guided.__qualname__ = original.__qualname__
    pipe.__class__ = guided
    try:
        yield session
    finally:
        pipe.__class__ = original


# ------------------------------------------------------------------ encoder features


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
