"""The autograd Function behind every score: the three pair sums, forward and backward streamed.

    F_x[k] = sum_ij Kx_k^2,   F_t = sum_ij Kt^2,   F_xt[k] = sum_ij Kx_k^2 Kt^2

Scores are then plain torch expressions of these float64 sums (RKE = n^2 / F_x, ...), so autograd
composes log, division and the caller's graph for free; only the sums need a custom backward.
Both backends (``ops.scores_torch`` and ``ops.scores_triton``) implement the same two functions,
``forward_sums`` and ``backward_grads``; this module dispatches between them.
"""

from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["backend_module", "pair_sums"]


def backend_module(backend: str) -> ModuleType:
    """The module implementing ``forward_sums``/``backward_grads`` for a resolved backend."""
    if backend == "triton":
        from . import scores_triton

        return scores_triton
    from . import scores_torch

    return scores_torch


_EMPTY = torch.empty(0, dtype=torch.float64)


class _PairSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, backend, inv_sx2, inv_st2, want_fx):
        impl = backend_module(backend)
        # the Triton precision mode in force now is the one the backward must use too
        prec = impl.get_precision() if backend == "triton" else None
        kw = {"precision": prec} if prec is not None else {}
        # centring: the kernel is translation invariant, so the gradient w.r.t. the centred data
        # equals the gradient w.r.t. the data (the centring Jacobian kills a zero-sum vector)
        xc = x - x.mean(0, keepdim=True)
        tc = t - t.mean(0, keepdim=True) if t is not None else None
        fx, ft, fxt = impl.forward_sums(xc, tc, inv_sx2, inv_st2, want_fx, **kw)
        ctx.save_for_backward(xc, tc if tc is not None else _EMPTY)
        ctx.meta = (backend, inv_sx2, inv_st2, t is not None, kw)
        ctx.set_materialize_grads(False)
        out = [v if v is not None else _EMPTY.to(x.device) for v in (fx, ft, fxt)]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        backend, inv_sx2, inv_st2, has_t, kw = ctx.meta
        xc, tc = ctx.saved_tensors
        tc = tc if has_t else None
        need_x = ctx.needs_input_grad[0]
        need_t = has_t and ctx.needs_input_grad[1]
        # the empty placeholder outputs (sums not asked for) carry no gradient
        g_fx, g_ft, g_fxt = (g if g is not None and g.numel() else None for g in grads)
        if (g_fx is None and g_ft is None and g_fxt is None) or not (need_x or need_t):
            return None, None, None, None, None, None
        impl = backend_module(backend)
        gx, gt = impl.backward_grads(
            xc, tc, inv_sx2, inv_st2, g_fx, g_ft, g_fxt, need_x=need_x, need_t=need_t, **kw
        )
        return gx, gt, None, None, None, None


def pair_sums(
    x: torch.Tensor,
    t: torch.Tensor | None,
    sigmas: list[float],
    sigma_t: float | None,
    *,
    want_fx: bool = True,
    backend: str = "torch",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(F_x (K,), F_t (), F_xt (K,)) float64 with autograd; inputs are validated already."""
    inv_sx2 = tuple(1.0 / (s * s) for s in sigmas)
    inv_st2 = 1.0 / (sigma_t * sigma_t) if sigma_t is not None else None
    fx, ft, fxt = _PairSums.apply(x, t, backend, inv_sx2, inv_st2, want_fx)
    return (
        fx if want_fx else None,
        ft if t is not None else None,
        fxt if t is not None else None,
    )
