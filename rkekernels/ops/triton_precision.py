"""Precision modes of the Triton score kernels and their stated error bounds.

What goes into ``tl.dot`` (`set_precision`, `precision`): "ieee" (default: exact arithmetic in the
input dtype, float32 tiles summed across tiles in float64, SPEC section 5), "tf32" and "bf16"
(the operands rounded on the host to TF32 / bfloat16, so tensor cores and the interpreter
compute the same products), "tf32x3" (three TF32 products per term). `error_bound` states the
bound of each mode on a pair sum and on a gradient row; the derivation is on the numerics page
(docs/numerics.md, "Triton score kernels"). `Plan` maps a mode to the operands the kernels read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import triton.language as tl

from .triton_tuning import interpreted

__all__ = [
    "PRECISIONS",
    "Plan",
    "check_precision",
    "error_bound",
    "get_precision",
    "precision",
    "round_tf32",
    "set_precision",
]

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")

# unit roundoff of the rounded operands of tl.dot
_UNIT = {"ieee": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}
_FP32_SLACK = 1e-5
_state = {"precision": "ieee"}


# --------------------------------------------------------------------------- precision option


def check_precision(mode: Any) -> str:
    """``mode`` if it is one of `PRECISIONS`, else a ValueError naming it."""
    if not isinstance(mode, str) or mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {mode!r}")
    return mode


def get_precision() -> str:
    """The current input precision of the Triton dots ("ieee" unless changed).

    Example:
        >>> from rkekernels.ops import scores_triton
        >>> scores_triton.get_precision()
        'ieee'
    """
    return _state["precision"]


def set_precision(mode: str) -> str:
    """Set the input precision of ``tl.dot`` for the Triton backend; returns the previous one.

    Args:
        mode: "ieee" (exact, default), "tf32", "tf32x3" or "bf16" (see the module docstring
            for what each does and `error_bound` for its error bound).

    Returns:
        str: the previous setting.

    Raises:
        ValueError: an unknown mode.

    The setting is process-wide and read at each call of `forward_sums` and `backward_grads`;
    run the backward pass under the same setting as the forward pass.

    Example:
        >>> from rkekernels.ops import scores_triton
        >>> old = scores_triton.set_precision("bf16")
        >>> scores_triton.get_precision(), old
        ('bf16', 'ieee')
        >>> _ = scores_triton.set_precision(old)
    """
    prev = _state["precision"]
    _state["precision"] = check_precision(mode)
    return prev


@contextlib.contextmanager
def precision(mode: str) -> Iterator[str]:
    """Context manager form of `set_precision`: the previous setting comes back on exit.

    Example:
        >>> from rkekernels.ops import scores_triton
        >>> with scores_triton.precision("bf16"):
        ...     scores_triton.get_precision()
        'bf16'
        >>> scores_triton.get_precision()
        'ieee'
    """
    prev = set_precision(mode)
    try:
        yield mode
    finally:
        _state["precision"] = prev


def error_bound(mode: str, scale: float, *, grad: bool = False) -> float:
    """Stated bound on the relative error of one pair sum F (or of a gradient row) in a mode.

    ``scale`` is S = sum over the kernels in the sum of c R^2 (c = 1/sigma^2, R = the largest
    distance of a row from the mean): S = c_x R_x^2 for F_x, c_t R_t^2 for F_t, their sum for F_xt.

        ieee:    e = 1e-5 (float32 arithmetic, SPEC section 5; float64 input: 1e-10)
        tf32:    e = exp(8 u S (1 + u)) - 1 + 1e-5,  u = 2^-11
        bf16:    e = exp(8 u S (1 + u)) - 1 + 1e-5,  u = 2^-8
        tf32x3:  e = exp(6 * 2^-20 S) - 1 + 1e-5,    u = 3 * 2^-20

    With ``grad=True`` the factor e + 3 u (1 + e)(1 + u) that bounds ||g~_i - g_i|| relative to
    sum_j |W|_ij (||x_i|| + ||x_j||) (module docstring).

    Args:
        mode: one of `PRECISIONS`.
        scale: S >= 0.
        grad: the gradient factor instead of the pair-sum bound.

    Returns:
        float: the bound.

    Example:
        >>> from rkekernels.ops.scores_triton import error_bound
        >>> error_bound("ieee", 3.0)
        1e-05
        >>> round(error_bound("bf16", 1.0), 4)
        0.0318
    """
    mode = check_precision(mode)
    if mode == "ieee":
        return _FP32_SLACK
    if mode == "tf32x3":
        u = 3.0 * 2.0**-20
        e = math.expm1(6.0 * 2.0**-20 * scale) + _FP32_SLACK
    else:
        u = _UNIT[mode]
        e = math.expm1(8.0 * u * scale * (1.0 + u)) + _FP32_SLACK
    return e + 3.0 * u * (1.0 + e) * (1.0 + u) if grad else e


# --------------------------------------------------------------------------- operands


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 explicit mantissa bits), half away from zero."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 4096) & -8192).view(torch.float32)


class Plan:
    """How a precision mode maps the inputs to what the kernels read."""

    def __init__(self, mode: str, dtype: torch.dtype):
        self.mode = mode
        self.out_dtype = dtype
        f64 = dtype == torch.float64 and mode == "ieee"
        self.acc = tl.float64 if f64 else tl.float32
        self.work = torch.float64 if f64 else torch.float32
        self.w_round = {"tf32": 1, "bf16": 2}.get(mode, 0)
        self.bf16_store = mode == "bf16" and not interpreted()
        # bfloat16 operands ignore input_precision: pass Triton's default for them
        self.dot_prec = "tf32" if self.bf16_store else ("ieee" if mode == "bf16" else mode)

    def operand(self, v: torch.Tensor | None) -> torch.Tensor | None:
        """The matrix the kernels read: the input, rounded to the mode's precision."""
        if v is None:
            return None
        v = v.detach().to(self.work).contiguous()
        if self.mode == "tf32":
            v = round_tf32(v)
        elif self.mode == "bf16":
            v = v.to(torch.bfloat16)
            v = v.contiguous() if self.bf16_store else v.to(torch.float32).contiguous()
        return v

    def norms(self, v: torch.Tensor | None, chunk: int = 65536) -> torch.Tensor | None:
        """Squared row norms of an operand, in the working dtype (row chunks: no n x d temp)."""
        if v is None:
            return None
        out = torch.empty(v.shape[0], dtype=self.work, device=v.device)
        for i0 in range(0, v.shape[0], chunk):
            b = v[i0 : i0 + chunk].to(self.work)
            out[i0 : i0 + chunk] = (b * b).sum(1)
        return out

    def key(self) -> tuple:
        return (self.mode, str(self.work))
