"""`sparke`: the context manager and the `SparkeSession` that guides each pipeline call."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ...sampling import DiversityGuidance
from .._checks import check_adapter_guidance
from .capture import _Capture, _prompt_of, auto_capture, capture_cond, has_prompt_cond, undouble
from .cond import DENOISERS, SparkeError, _fixed_cond
from .decoded import DecodedFeatures, _image_size
from .routes import scheduler_step, step_end_callback


class SparkeSession:
    """What `sparke` yields: the guided pipeline, its guidance, and how the last call went.

    Attributes:
        pipe, guidance: as given to `sparke`.
        route: ``"callback_on_step_end"`` or ``"scheduler.step"``: how calls are guided.
        cond_source: where the last call's prompt embeddings came from (``"cond"``,
            ``"class_labels"``, ``"pooled_projections"``, ``"added_cond_kwargs['text_embeds']"``,
            ``"added_cond_kwargs['image_embeds']"``,
            ``"encoder_hidden_states (encoder_attention_mask)"``,
            ``"encoder_hidden_states (encoder_hidden_states_mask)"``,
            ``"encoder_hidden_states (tokenizer mask)"``, ``"encoder_hidden_states (all tokens)"``),
            or None (unconditional: ``sigma_cond=math.inf``, or an automatic ``sigma_cond`` on
            a pipeline without prompt conditioning or a bank filled without prompts).
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
            "prompt": _prompt_of(self._params, args, kwargs),
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

        def hook(latents: torch.Tensor, i: int, total: int) -> torch.Tensor:
            z, doubled = undouble(latents, capture)
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

        step = scheduler_step(scheduler, state, hook, self.route == "scheduler.step")
        if self.route == "callback_on_step_end":
            kwargs = step_end_callback(kwargs, self._params, name, hook)

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

    def _cond(self, pipe: Any, capture: _Capture, b: int, state: dict) -> torch.Tensor | None:
        """This step's prompt embeddings, or None (unconditional); see `sparke`'s "Prompts"."""
        guidance = self.guidance
        if guidance.sigma_cond == math.inf:  # prompts ignored: nothing is captured
            return None
        if self.cond is not None:
            self.cond_source = "cond"  # sigma_cond=None: conditional from here on
            return self.cond
        if not guidance.conditional and not (
            auto_capture(guidance) and (state["cond"] is not None or has_prompt_cond(capture))
        ):
            return None  # nothing to capture, or a bank filled without prompts
        return capture_cond(pipe, capture, b, state["cond"], state["prompt"], self._note)

    def _note(self, source: str) -> None:
        self.cond_source = source


_GUIDED = "_rkekernels_sparke_session"


@contextmanager
def sparke(pipe: Any, guidance: DiversityGuidance, *, cond: Any = None) -> Iterator[SparkeSession]:
    """Guide every call of a diffusers pipeline with SPARKE inside a ``with`` block.

    Inside the block each ``pipe(...)`` call runs with `DiversityGuidance.apply` after every
    scheduler step (through ``callback_on_step_end`` where the pipeline has it, else through a
    wrapper of ``pipe.scheduler.step``) and commits its final latents (and their ``cond``) to
    ``guidance.bank``: b images per call, pushed away from every earlier one. The pipeline is
    not forked; its class, scheduler and denoiser are restored on exit, also after an exception.

    Prompts: with no ``cond`` given, the prompt embeddings are captured from what the pipeline
    hands its denoiser (the package docstring: class labels as one-hot vectors, else the pooled
    text embedding, else a mask-aware mean of the token embeddings, else Kandinsky 2.2's image
    embedding), by ``guidance.sigma_cond``:

    - None (the default, automatic): captured whenever the pipeline has prompt conditioning,
      and the guidance is prompt-aware from the first step of the first call. A pipeline without
      any (DDPM, DDIM, LDM: the denoiser gets the sample and the timestep only) is guided
      unconditionally, without an error. A bank that already holds rows committed without
      prompts (an earlier unconditional call, ``guidance.commit(latents)``) keeps the guidance
      unconditional: its rows have no prompt to weigh (start a new guidance, or pass ``cond``,
      which then raises the "committed without cond" error).
    - a number: prompt-aware; captured, and a pipeline without prompt conditioning is an error.
    - ``math.inf``: prompts ignored, nothing is captured (a ``cond`` given is unused).

    ``session.cond_source`` tells where the last call's embeddings came from (None when the
    call was unconditional).

    Args:
        pipe: a diffusers pipeline (any ``DiffusionPipeline`` with a ``scheduler``).
        guidance: a `rkekernels.DiversityGuidance` (bandwidths, scale, schedule, bank).
        cond: fixed prompt embeddings (b, m), (m,) or (b, tokens, m) (mean-pooled) for every
            call; None: captured from each call as "Prompts" says (or not used).

    Yields:
        A `SparkeSession` (``.route``, ``.cond_source``, ``.steps``, ``.calls``).

    Raises:
        TypeError: guidance is not a DiversityGuidance; pipe has no scheduler.
        ValueError: cond given to a guidance whose bank holds rows committed without cond;
            the pipe is already inside `sparke`; at run time, prompt embeddings that cannot be
            matched to the latents, or none at all for a finite ``sigma_cond``.
        SparkeError: a call during which the guidance never ran (the message says why).

    Example:
        >>> import torch
        >>> from rkekernels import DiversityGuidance
        >>> from rkekernels.adapters._tiny import tiny_pipeline
        >>> from rkekernels.adapters.diffusers import sparke
        >>> pipe = tiny_pipeline("dit")                       # random weights, 8x8 latents
        >>> guide = DiversityGuidance()      # automatic: prompt-aware on the captured labels
        >>> with sparke(pipe, guide) as session:
        ...     for seed in range(2):
        ...         _ = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="latent",
        ...                  generator=torch.Generator().manual_seed(seed))
        >>> len(guide.bank), session.route, session.cond_source, guide.conditional
        (4, 'scheduler.step', 'class_labels', True)
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
