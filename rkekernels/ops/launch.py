"""Where Triton kernels launch: on the device of their tensors, not the current CUDA device.

A Triton launch goes to ``torch.cuda.current_device()``. Tensors on ``cuda:1`` launched while
device 0 is current would run on the wrong GPU (an illegal memory access, or a silent wrong
result). Every launcher enters `on_device` around its allocations and launches.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["launches_on_input", "on_device"]

F = TypeVar("F", bound=Callable)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(t.device)`` for a CUDA tensor, else a no-op context (CPU tensors under
    TRITON_INTERPRET=1).

    Example:
        >>> import torch
        >>> with on_device(torch.zeros(1)):
        ...     pass
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def launches_on_input(fn: F) -> F:
    """Decorate a launcher: its body (allocations, tuning, launches) runs under `on_device` of
    its first argument."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with on_device(first):
            return fn(first, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
