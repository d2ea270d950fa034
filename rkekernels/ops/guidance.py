"""Dispatch for `rkekernels.guidance_grad`: path and backend choice, the checks, the retries.

`guidance_grad` validates its inputs into a `Problem` and calls `guide`, which chooses the path:
the other objectives (algorithm="vendi", the cosine/linear kernels: ``ops.guidance_kernels``),
the float64 direct-difference path (``ops.guidance_exact``: bandwidths past `EXACT_FROM`, or a
fast path that overflowed on finite inputs), or the fast paths below (`fast_guide`). The
per-backend files hold only the math of the bank pass, each with the same ``softmax_state``
contract (the current features, the bank side as one ``BankSide``; state in, state out); what
they share (`Problem`, ``BankSide``, `batch_state`, `merge_states`, `finish`) is in
``ops.guidance_common``, which they import (re-exported here but ``BankSide``):

- ``ops.guidance_cpu`` (CPU tensors, numba installed): the fused kernels of
  ``ops.guidance_numba``, the whole call in compiled code (its own copy of `finish`, in
  numba: a torch op costs ~40 us, a compiled loop ~20 on these sizes);
- ``ops.guidance_torch``: two GEMMs per cached chunk of the bank (CPU without numba, CUDA with
  backend="torch");
- ``ops.guidance_triton``: one kernel split over the bank (CUDA, or the interpreter; Triton
  imported only when that backend runs).

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

from .._input import check_finite
from . import guidance_cpu, guidance_exact, guidance_kernels, guidance_torch
from .guidance_common import Problem, batch_state, finish, merge_states

__all__ = [
    "EXACT_FROM",
    "Problem",
    "backend_module",
    "batch_state",
    "explain_non_finite",
    "fast_guide",
    "finish",
    "guide",
    "merge_states",
    "uses_numba",
]

#: 1/s^2 (or 1/s_c^2) from which `guide` takes the float64 direct-difference path
#: (`rkekernels.ops.guidance_exact`), per compute dtype: there the fast paths' logits carry a
#: rounding error of eps (||a||^2 + ||b||^2) / s^2 of about 2e-3 nats (float32) or 4e-4 nats
#: (float64) for unit-norm features. Below 1e-280 (a huge bandwidth, 1/s^2 near underflow) the
#: same path folds the data's scale into the bandwidth.
EXACT_FROM = {torch.float32: 1e4, torch.float64: 1e12}


def backend_module(backend: str) -> ModuleType:
    """The module whose ``softmax_state`` runs the bank pass for a resolved backend."""
    if backend == "triton":
        from . import guidance_triton  # Triton: imported only when that backend runs

        return guidance_triton
    return guidance_torch


def uses_numba(backend: str, device: torch.device) -> bool:
    """Whether `guide` runs the fused numba kernel: backend "torch", CPU tensors, numba loads."""
    if backend != "torch" or device.type != "cpu":
        return False
    return guidance_cpu.enabled()


def guide(
    p: Problem,
    backend: str,
    *,
    auto: bool = False,
    sync: bool = True,
    algorithm: str = "rke",
    kernel: str = "gaussian",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad (b, D), log S (b,)) of a validated `Problem`: the one entry of `guidance_grad`.

    Chooses the path: algorithm="vendi" or a cosine/linear kernel go to
    `rkekernels.ops.guidance_kernels`; 1/s^2 or 1/s_c^2 beyond `EXACT_FROM` (or below 1e-280),
    or ||z|| beyond the compute dtype on the numba path, to the float64 direct differences of
    `rkekernels.ops.guidance_exact`; everything else to `fast_guide`, whose failure on finite
    inputs (every logit overflowed) falls back to the float64 path.

    Args:
        p: the validated call.
        backend: the resolved backend, "torch" or "triton".
        auto: the caller asked for "auto" (see `fast_guide`).
        sync: check the result on the host and raise, naming the input at fault (one sync).
            False: no sync on the fast paths (capturable in a CUDA graph): a result that would
            have raised is NaN instead.
        algorithm, kernel: as `rkekernels.guidance_grad`.

    Returns:
        grad in the compute dtype (float64 from the exact path) and log S; the caller casts.

    Raises:
        ValueError: (with ``sync``) NaN/Inf in an input, a zero latent under ``normalize``, a
            gradient beyond the output dtype (sigma too small); an unknown algorithm or kernel.
    """
    if algorithm != "rke" or kernel != "gaussian":  # vendi, cosine, linear
        return _other_objective(p, algorithm, kernel, sync)
    # beyond EXACT_FROM the fast paths' distance form cannot tell entries apart (its rounding
    # times 1/s^2 exceeds a nat): the float64 path by direct differences decides instead
    cdt = p.compute_dtype
    inv = (p.inv_s2, p.inv_c2) if p.y is not None else (p.inv_s2,)
    exact = max(inv) > EXACT_FROM[cdt] or min(inv) < 1e-280
    if not exact and p.normalize and uses_numba(backend, p.z.device):
        # ||z|| overflowed the compute dtype: the exact path scales first (the other paths
        # check ||z|| among the results, in their one sync)
        exact = not bool(torch.isfinite(p.z.to(cdt).norm(dim=1)).all())
    if exact:  # (not capturable: it checks on the host)
        try:
            check_finite(p.z, "z")
            return _exact(p)
        except ValueError:
            if sync:
                raise
            nan = torch.full_like(p.z, math.nan)
            return nan, torch.full((p.z.shape[0],), math.nan, dtype=p.z.dtype, device=p.z.device)
    g, log_s, ok = fast_guide(p, backend, auto=auto, sync=sync)
    if not ok:  # (only with sync: without it NaN marks the result instead)
        explain_non_finite(p)
        return _exact(p)
    return g, log_s


def _other_objective(
    p: Problem, algorithm: str, kernel: str, sync: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """algorithm="vendi" or a dot kernel, its result checked like the fast paths'."""
    g, log_s = guidance_kernels.guide(p, algorithm, kernel)
    if not sync:
        bad = ~torch.isfinite(g).all()
        g, log_s = torch.where(bad, math.nan, g), torch.where(bad, math.nan, log_s)
    elif not bool(torch.isfinite(g).all()):
        explain_non_finite(p)
    return g, log_s


def _exact(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 direct-difference path, its result checked against the output dtype."""
    g, log_s = guidance_exact.guide(p)
    dt = p.out_dtype
    big = float(g.abs().max()) if g.numel() else 0.0
    if not big <= float(torch.finfo(dt).max):
        raise ValueError(
            f"sigma={p.sigma!r} is too small for a representable gradient: -d log S/dz = "
            f"(2/sigma^2)(phi - sum_j pi_j f_j) reaches {big:.3g}, beyond {dt} (max "
            f"{torch.finfo(dt).max:.3g}); use a larger sigma"
            + (" or float64 z" if dt != torch.float64 else "")
        )
    return g, log_s


def explain_non_finite(p: Problem) -> None:
    """The result is not finite: name the input at fault (checked lazily, off the hot path).

    Returns (finite inputs: the caller retries on the float64 direct-difference path).
    """
    check_finite(p.z, "z")
    if p.normalize and not bool((p.z.norm(dim=1) > 0).all()):
        raise ValueError(
            "z has a sample whose latent is all zeros: its normalised feature is undefined; "
            "use normalize=False or drop that sample"
        )
    if p.y is not None:
        check_finite(p.y, "cond")
    check_finite(p.bank, "bank")
    if p.bank_cond is not None:
        check_finite(p.bank_cond, "bank_cond")


def fast_guide(
    p: Problem, backend: str, *, auto: bool = False, sync: bool = True
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The guidance gradient and log S on the fast paths (numba, chunked GEMMs, Triton).

    Args:
        p: the validated call; z and y are taken in its compute dtype.
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
    cdt = p.compute_dtype
    z = p.z.to(cdt)
    y = p.y.to(cdt) if p.y is not None else None
    inv_s2, inv_c2, bank_cond = p.inv_s2, p.inv_c2, p.bank_cond
    batch = p.batch
    entries = p.bank.shape[0] > 0 or batch
    if backend == "triton" and auto and z.dtype == torch.float64:
        backend = "torch"
    if uses_numba(backend, z.device):  # numba: the whole computation in compiled code
        g, log_s, ok = guidance_cpu.guide(p, z, y)
        # log S = -inf with entries present: every logit overflowed to -inf (finite inputs
        # too large for the compute dtype): not ok, the caller's exact path takes over
        ok = ok and not (entries and bool(torch.isinf(log_s).any()))
        if not ok and not sync:  # no error, no retry: NaN marks the result (as on CUDA)
            return torch.full_like(g, math.nan), torch.full_like(log_s, math.nan), True
        return g, log_s, ok
    impl = backend_module(backend)
    znorm = z.norm(dim=1, keepdim=True) if p.normalize else None
    phi = z / znorm if p.normalize else z
    row_const = (phi * phi).sum(1) * inv_s2  # ||phi||^2/s^2 (+ ||y||^2/s_c^2): bounds every logit
    if y is not None:
        row_const = row_const + (y * y).sum(1) * inv_c2
    # torch: shift the logits by that bound, falling back to the running max if every term
    # underflows; Triton: a running max in registers. Without the sync there is no retry: the
    # running max from the start.
    shift = row_const if backend == "torch" and sync else None
    side = p.bank_side
    # the other current samples first (a tiny b x b state), then the bank streams into it
    state = batch_state(phi, y, inv_s2, inv_c2, shift) if batch else None
    m, l, acc = impl.softmax_state(phi, y, side, state, shift)
    g, log_s, checks = finish(phi, y, znorm, m, l, acc, row_const, inv_s2)
    # every value the result rests on is finite (||z|| too: an overflowed norm gives phi = 0
    # and a finite, wrong gradient); an infinite prompt embedding can turn a logit into -inf
    # (that entry silently dropped) instead of NaN: the torch path makes such logits NaN (from
    # the prompt norms, O(n)); for the Triton kernel bank_cond is checked directly (n x m);
    # log S = -inf with entries present: every logit overflowed. All device-side.
    ok = torch.isfinite(checks).all()
    if p.normalize:
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
        m, l, acc = impl.softmax_state(phi, y, side, state, None)
        g, log_s, checks = finish(phi, y, znorm, m, l, acc, row_const, inv_s2)
        good = torch.isfinite(checks).all() & ~torch.isinf(log_s).any()
        ok = bool(good & torch.isfinite(znorm).all()) if p.normalize else bool(good)
    return g, log_s, bool(ok)
