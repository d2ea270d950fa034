"""Dispatch for `rkekernels.guidance_grad`: backend choice, the softmax state, the finish.

`guidance_grad` validates its inputs and calls `guide`; the per-backend files hold only the math
of the bank pass, each with the same ``softmax_state`` contract (state in, state out):

- ``ops.guidance_cpu`` (CPU tensors, numba installed): the fused kernels of
  ``ops.guidance_numba``, the whole call in compiled code (its own copy of the finish below, in
  numba: a torch op costs ~40 us, a compiled loop ~20 on these sizes);
- ``ops.guidance_torch``: two GEMMs per cached chunk of the bank (CPU without numba, CUDA with
  backend="torch");
- ``ops.guidance_triton``: one kernel split over the bank (CUDA, or the interpreter).

Math (SPEC section 2). With phi_a the features, row_const_a = ||phi_a||^2/s^2 + ||y_a||^2/s_c^2
(an upper bound of every logit) and a softmax state (m, l, acc) over the entries::

    log S_a = m_a - row_const_a + log l_a
    grad_a  = J_a^T (2 / s^2) (phi_a - acc_a / l_a)

J_a the Jacobian of the feature map (identity, or (I - u u^T)/||z_a|| when normalised). The torch
backend shifts its logits by row_const (no running max, no per-chunk rescale) and, only when
every term underflowed, takes a second pass with a running max; the Triton and numba kernels
keep a running max (one pass always).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

__all__ = ["backend_module", "batch_state", "finish", "guide", "merge_states", "uses_numba"]

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def backend_module(backend: str) -> ModuleType:
    """The module whose ``softmax_state`` runs the bank pass for a resolved backend."""
    if backend == "triton":
        from . import guidance_triton

        return guidance_triton
    from . import guidance_torch

    return guidance_torch


def uses_numba(backend: str, device: torch.device) -> bool:
    """Whether `guide` runs the fused numba kernel: backend "torch", CPU tensors, numba loads."""
    if backend != "torch" or device.type != "cpu":
        return False
    from . import guidance_cpu

    return guidance_cpu.enabled()


def guide(
    z: torch.Tensor,
    normalize: bool,
    y: torch.Tensor | None,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None,
    bank_cond: torch.Tensor | None,
    bank_cond_sq: torch.Tensor | None,
    inv_s2: float,
    inv_c2: float,
    include_batch: bool,
    backend: str,
    auto: bool = False,
    sync: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The guidance gradient and log S of b samples, after `guidance_grad`'s input checks.

    Args:
        z: (b, D) flattened latents in the compute dtype (float32 or float64).
        normalize: phi = z / ||z|| (and the chain rule through it), else phi = z.
        y: (b, m) prompt embeddings in the compute dtype, or None.
        bank, bank_sq, bank_cond, bank_cond_sq: the entries and their cached squared norms
            (None: computed on the fly); bank_cond is None iff y is.
        inv_s2, inv_c2: 1/s^2 and 1/s_c^2.
        include_batch: the other b - 1 samples count as entries (each without itself).
        backend: the resolved backend, "torch" or "triton".
        auto: the caller asked for "auto": float64 then stays on the torch path (float64 GEMMs,
            1e-10) rather than the Triton kernel.
        sync: check the result on the host (one sync; two when the torch path retries with a
            running max). False: no sync at all (capturable in a CUDA graph): a result that
            would have failed the check is NaN instead, and the torch path keeps a running max.

    Returns:
        (grad (b, D), log S (b,), ok): ok is False (only with ``sync``) when an input or the
        result is not finite, or log S = -inf although there are entries (every logit
        overflowed): the caller names the input, or takes the float64 direct-difference path.
        All checks are device-side reductions: no host-to-device copies.
    """
    batch = include_batch and z.shape[0] > 1
    entries = bank.shape[0] > 0 or batch
    if backend == "triton" and auto and z.dtype == torch.float64:
        backend = "torch"
    if uses_numba(backend, z.device):  # numba: the whole computation in compiled code
        from . import guidance_cpu

        g, log_s, ok = guidance_cpu.guide(
            z, normalize, y, bank, bank_sq, bank_cond, bank_cond_sq, inv_s2, inv_c2, batch
        )
        # log S = -inf with entries present: every logit overflowed to -inf (finite inputs
        # too large for the compute dtype): not ok, the caller's exact path takes over
        ok = ok and not (entries and bool(torch.isinf(log_s).any()))
        if not ok and not sync:  # no error, no retry: NaN marks the result (as on CUDA)
            return torch.full_like(g, math.nan), torch.full_like(log_s, math.nan), True
        return g, log_s, ok
    impl = backend_module(backend)
    znorm = z.norm(dim=1, keepdim=True) if normalize else None
    phi = z / znorm if normalize else z
    row_const = (phi * phi).sum(1) * inv_s2  # ||phi||^2/s^2 (+ ||y||^2/s_c^2): bounds every logit
    if y is not None:
        row_const = row_const + (y * y).sum(1) * inv_c2
    # torch: shift the logits by that bound, falling back to the running max if every term
    # underflows; Triton: a running max in registers. Without the sync there is no retry: the
    # running max from the start.
    shift = row_const if backend == "torch" and sync else None
    args = (phi, bank, bank_sq, y, bank_cond, bank_cond_sq, inv_s2, inv_c2)
    # the other current samples first (a tiny b x b state), then the bank streams into it
    state = batch_state(phi, y, inv_s2, inv_c2, shift) if batch else None
    m, l, acc = impl.softmax_state(*args, state, shift)
    g, log_s, checks = finish(phi, y, znorm, m, l, acc, row_const, inv_s2)
    # every value the result rests on is finite (||z|| too: an overflowed norm gives phi = 0
    # and a finite, wrong gradient); an infinite prompt embedding can turn a logit into -inf
    # (that entry silently dropped) instead of NaN: the torch path makes such logits NaN (from
    # the prompt norms, O(n)); for the Triton kernel bank_cond is checked directly (n x m);
    # log S = -inf with entries present: every logit overflowed. All device-side.
    ok = torch.isfinite(checks).all()
    if normalize:
        ok = ok & torch.isfinite(znorm).all()
    if bank_cond is not None and backend == "triton":
        ok = ok & torch.isfinite(bank_cond).all()
    if entries:
        ok = ok & ~torch.isinf(log_s).any()
    if not sync:  # capturable: no error, no retry; NaN marks a result that would have raised
        bad = ~ok
        return torch.where(bad, math.nan, g), torch.where(bad, math.nan, log_s), True
    # one host sync: is it finite; did the shifted sums leave [tiny, 1/tiny] (every term
    # underflowed, or rounding pushed a huge-scale exponent up; NaN counts too)
    tiny = 1e-280 if z.dtype == torch.float64 else 1e-20
    out_of_range = ~((l >= tiny) & (l <= 1.0 / tiny)).all()
    ok, retry = torch.stack([ok, out_of_range]).tolist()
    if shift is not None and retry and entries:
        state = batch_state(phi, y, inv_s2, inv_c2, None) if batch else None
        m, l, acc = impl.softmax_state(*args, state, None)
        g, log_s, checks = finish(phi, y, znorm, m, l, acc, row_const, inv_s2)
        good = torch.isfinite(checks).all() & ~torch.isinf(log_s).any()
        ok = bool(good & torch.isfinite(znorm).all()) if normalize else bool(good)
    return g, log_s, bool(ok)


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
