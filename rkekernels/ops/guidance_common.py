"""What the guidance backends share with their dispatcher (`rkekernels.ops.guidance`).

The validated call (`Problem`), the bank side of a bank pass (`BankSide`: what each backend's
``softmax_state`` reads besides the current samples) and the softmax state helpers: the batch's
own state (`batch_state`), the online-softmax merge of the states of disjoint parts of the bank
(`merge_states`) and the gradient and log S from a state (`finish`). The dispatcher imports the
backends; the backends import only this module (no import cycle).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = ["BankSide", "Problem", "State", "batch_state", "finish", "merge_states"]

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BankSide(NamedTuple):
    """The bank side of a bank pass: the argument every backend's ``softmax_state`` takes.

    The same for all backends (``ops.guidance_torch``, ``ops.guidance_cpu``,
    ``ops.guidance_triton``) and for every pass of one call; `Problem.bank_side` builds it.

    Attributes:
        bank: (n, D) bank features in any floating dtype (each backend reads the rows in the
            compute dtype, a chunk or block at a time); n may be 0.
        bank_sq: (n,) cached ||f_j||^2, or None to compute them from the rows.
        bank_cond: (n, m) prompt embeddings of the bank (None iff the current samples have none).
        bank_cond_sq: (n,) cached ||c_j||^2, or None to compute them from the rows.
        inv_s2, inv_c2: 1/s^2 and 1/s_c^2.

    Example:
        >>> side = BankSide(torch.zeros(0, 3), None, None, None, 1.0, 0.0)
        >>> side.bank.shape[0]
        0
    """

    bank: torch.Tensor
    bank_sq: torch.Tensor | None
    bank_cond: torch.Tensor | None
    bank_cond_sq: torch.Tensor | None
    inv_s2: float
    inv_c2: float


class Problem(NamedTuple):
    """One `guidance_grad` call after its input checks: what every path of `guide` reads.

    Immutable (a NamedTuple: built once per call, in well under a microsecond).

    Attributes:
        z: (b, D) flattened latents (detached; float32 or float64 as given).
        normalize: phi = z / ||z|| (and the chain rule through it), else phi = z.
        y: (b, m) prompt embeddings of the current samples (as given), or None.
        bank: (n, D) bank features in any floating dtype; n may be 0.
        bank_sq: (n,) cached ||f_j||^2 (a FeatureBank's, float64), or None.
        bank_cond: (n, m) the bank's prompt embeddings; None exactly when ``y`` is.
        bank_cond_sq: (n,) their cached squared norms, or None.
        sigma: the feature bandwidth s as the caller gave it (checked: finite, > 0).
        sigma_cond: the prompt bandwidth s_c as given, or None.
        inv_s2: 1/s^2; inv_c2: 1/s_c^2 (0.0 without sigma_cond).
        include_batch: the other b - 1 current samples count as entries.
        out_dtype: the dtype of the result (z's): the float64 path checks that its gradient is
            representable there.
    """

    z: torch.Tensor
    normalize: bool
    y: torch.Tensor | None
    bank: torch.Tensor
    bank_sq: torch.Tensor | None
    bank_cond: torch.Tensor | None
    bank_cond_sq: torch.Tensor | None
    sigma: Any
    sigma_cond: Any
    inv_s2: float
    inv_c2: float
    include_batch: bool
    out_dtype: torch.dtype

    @property
    def batch(self) -> bool:
        """Whether the other current samples are entries (``include_batch`` and b > 1)."""
        return self.include_batch and self.z.shape[0] > 1

    @property
    def bank_side(self) -> BankSide:
        """The bank, its prompt embeddings, cached norms and bandwidths, as `BankSide`."""
        return BankSide(
            self.bank, self.bank_sq, self.bank_cond, self.bank_cond_sq, self.inv_s2, self.inv_c2
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 when z or the bank is float64, else float32."""
        return torch.float64 if torch.float64 in (self.z.dtype, self.bank.dtype) else torch.float32


def batch_state(
    phi: torch.Tensor,
    y: torch.Tensor | None,
    inv_s2: float,
    inv_c2: float,
    shift: torch.Tensor | None,
) -> State:
    """Softmax state of each sample against the other b - 1 (constants, self excluded).

    With ``shift`` the state is taken relative to it (as the bank pass will be), else to the max.
    """
    logits = (phi @ phi.T) * (2.0 * inv_s2) - (phi * phi).sum(1) * inv_s2  # (b, b): [a, c]
    if y is not None:
        logits = logits + (y @ y.T) * (2.0 * inv_c2) - (y * y).sum(1) * inv_c2
    eye = torch.eye(phi.shape[0], dtype=torch.bool, device=phi.device)
    logits = logits.masked_fill(eye, -math.inf)
    m = shift if shift is not None else logits.amax(1)
    p = torch.exp(logits - m.unsqueeze(1))
    return m, p.sum(1), p @ phi


def merge_states(
    m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, running: bool = True
) -> State:
    """One softmax state from the states of P disjoint sets of entries (online-softmax merge).

    Args:
        m: (P, b) each part's shift (its running max, or one common shift when not ``running``).
        l: (P, b) and acc: (P, b, D) each part's sums relative to its own m (float64).
        running: the parts have their own maxima; False: all share m[0] (then a plain sum).

    Returns:
        (m (b,), l (b,), acc (b, D)) relative to the largest m: l = sum_p exp(m_p - m) l_p, and
        acc alike. A part that saw nothing (m = -inf, l = 0) weighs 0 (never exp(-inf + inf)).
    """
    if not running:
        return m[0], l.sum(0), acc.sum(0)
    top = m.amax(0)
    w = torch.where(m == -math.inf, 0.0, torch.exp(m - top)).to(l.dtype)  # (P, b)
    return top, (w * l).sum(0), (w.unsqueeze(2) * acc).sum(0)


def finish(
    phi: torch.Tensor,
    y: torch.Tensor | None,
    znorm: torch.Tensor | None,
    m: torch.Tensor,
    l: torch.Tensor,
    acc: torch.Tensor,
    row_const: torch.Tensor,
    inv_s2: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad (b, D), log S (b,), values to check for NaN/Inf) from a softmax state."""
    has = l > 0
    l_safe = torch.where(has, l, torch.ones_like(l))
    log_s = torch.where(has, (m - row_const) + torch.log(l_safe), torch.full_like(l, -math.inf))
    g = (phi - acc / l_safe.unsqueeze(1)) * (2.0 * inv_s2)
    g = torch.where(has.unsqueeze(1), g, torch.zeros_like(g))
    if znorm is not None:  # chain rule through phi = z / ||z||: (I - u u^T) g / ||z||
        g = (g - phi * (phi * g).sum(1, keepdim=True)) / znorm
    checks = [phi.reshape(-1), g.reshape(-1), l, torch.where(has, log_s, 0.0)]
    if y is not None:
        checks.append(y.reshape(-1))
    return g, log_s, torch.cat(checks)
