"""The two ways `sparke` reaches into a pipeline call (`SparkeSession.route`).

- ``"callback_on_step_end"``: `step_end_callback` puts a callback that guides ``latents`` into
  the call's arguments, chained before a callback of the caller's own;
- ``"scheduler.step"``: `scheduler_step` wraps ``pipe.scheduler.step`` and guides the
  ``prev_sample`` it returns.

The scheduler wrapper is installed on both routes: it counts the steps and keeps each step's
prediction of the clean latents (for `rkekernels.adapters.diffusers.decoded_features`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .cond import SparkeError
from .decoded import _x0_prediction

#: hook(latents, step index, number of steps) -> the guided latents
Hook = Callable[[torch.Tensor, int, int], torch.Tensor]


def scheduler_step(scheduler: Any, state: dict, hook: Hook, guide: bool) -> Callable:
    """A wrapper of ``scheduler.step``: counts the steps in ``state["sched"]``, keeps the x0
    prediction in ``state["x0"]`` and, with ``guide``, guides the ``prev_sample`` it returns."""
    inner_step = scheduler.step

    def step(*a: Any, **k: Any) -> Any:
        out = inner_step(*a, **k)
        i = state["sched"]
        state["sched"] += 1
        state["x0"] = _x0_prediction(scheduler, a, k, out)
        if not guide:
            return out
        total = len(scheduler.timesteps)
        if isinstance(out, tuple):
            return (hook(out[0], i, total), *out[1:])
        out.prev_sample = hook(out.prev_sample, i, total)
        return out

    return step


def step_end_callback(kwargs: dict, params: Any, name: str, hook: Hook) -> dict:
    """The call's keyword arguments with a ``callback_on_step_end`` that guides ``latents``.

    A callback given to the call still runs, after the guidance, with the tensors it asks for;
    ``callback_on_step_end_tensor_inputs`` is passed (with ``"latents"`` first) where the
    pipeline's ``__call__`` (``params``) takes it.
    """
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
    if "callback_on_step_end_tensor_inputs" in params:
        kwargs["callback_on_step_end_tensor_inputs"] = inputs
    return kwargs
