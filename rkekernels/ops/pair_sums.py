"""The autograd Function behind every score: the three pair sums, forward and backward streamed.

    F_x[k] = sum_ij Kx_k^2,   F_t = sum_ij Kt^2,   F_xt[k] = sum_ij Kx_k^2 Kt^2

Scores are then plain torch expressions of these float64 sums (RKE = n^2 / F_x, ...), so autograd
composes log, division and the caller's graph for free; only the sums need a custom backward.
Both backends (``ops.scores_torch`` and ``ops.scores_triton``) implement the same two functions,
``forward_sums`` and ``backward_grads``; this module dispatches between them. One case is fused
(``ops.score_and_grad``): the torch backend with one bandwidth, no prompts and a gradient to come
(grad mode on, x requires grad) computes F_x and dF_x/dx in one pass over the tiles (1.5
GEMM-equivalents instead of 2), and the backward only scales the saved gradient.

Scale folding (finite for every finite input and every bandwidth). The sums are invariant under
x -> x / a, sigma -> sigma / a. Before the kernels the data is divided by a power of two
a >= max |x_ij| (exact: no rounding), and the kernels get c_k = (a / sigma_k)^2 computed in
float64 and clamped to `C_MAX` of the working dtype (so ``c * 0`` on the diagonal is 0, never
inf * 0 = NaN, and ``1 / sigma^2`` never divides by zero). Far beyond the clamp every pair at a
positive distance already has k^2 = 0 to working precision, so the clamp changes nothing that
the dtype can represent. Huge coordinates (float32 near 3e38, float64 near 1e300) then give the
scores of the same points scaled down with the bandwidth, and the gradient is scaled back by 1/a.

Centring is anchored at the first row: ``(x - x_0) - mean(x - x_0)``, so a set of equal points
becomes exactly zero (its score is 1 at any bandwidth), where ``x - mean(x)`` would leave the
rounding of the mean, which a tiny bandwidth magnifies.

Second derivatives are refused: the Function is differentiable once. Under ``create_graph=True``
its gradients carry a node whose backward raises a RuntimeError ("differentiable once"), so a
Hessian-vector product or a double backward fails loudly instead of returning a wrong number;
the dense float64 `rkekernels.reference` has derivatives of all orders.

Progress over the tiles (`reporting`): inside ``with reporting(callback):`` every torch-backend
forward pass reports ``callback(pairs_done, pairs_total)`` per tile (see
``scores_torch.forward_sums``), for every score built on `pair_sums` (`rkekernels.rke_score`,
`cond_rke_score`, `rke_entropies`, and the Gaussian order-2 exact Vendi scores), without a new
argument on their pinned signatures. The Triton backend and the backward pass report nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch

from . import score_and_grad, scores_torch

__all__ = [
    "C_MAX",
    "backend_module",
    "inv_sq",
    "pair_sums",
    "prepare",
    "reporting",
    "scale_of",
]

#: the progress callback of the forward passes in this context (`reporting`); None: silent
_PROGRESS: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "rkekernels_pair_progress", default=None
)


@contextlib.contextmanager
def reporting(progress: Callable[[int, int], None] | None) -> Iterator[None]:
    """Within the block, torch-backend pair-sum passes call ``progress(pairs_done, pairs_total)``.

    ``pairs_total`` is the number of kernel entries the pass computes (the tiles' areas,
    `scores_torch.tile_pairs`, about n^2 / 2), reported as ``(0, total)`` first and after each
    tile, ending at ``(total, total)``; each pass (each score call) starts again from 0. The
    setting is per thread / async context (a `contextvars.ContextVar`) and is restored on exit;
    ``None`` switches reporting off inside the block. Triton passes report nothing.

    Example:
        >>> import torch, rkekernels
        >>> from rkekernels.ops.pair_sums import reporting
        >>> calls = []
        >>> with reporting(lambda done, total: calls.append((done, total))):
        ...     s = rkekernels.rke_score(torch.randn(50, 3), 1.0, backend="torch")
        >>> calls[0], calls[-1]  # one tile of 50 x 50 at the default tile size
        ((0, 2500), (2500, 2500))
    """
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


#: Largest c = 1/sigma^2 (in units of the scaled data) handed to the kernels, per working dtype:
#: finfo.max / 64 leaves room for the log2(e) factor of the Triton kernels and the 4 c factor of
#: the gradient weights. exp(-c D) with D > 0 is 0 long before it (D >= the smallest normal).
C_MAX = {
    torch.float32: float(torch.finfo(torch.float32).max) / 64.0,
    torch.float64: float(torch.finfo(torch.float64).max) / 64.0,
}


def backend_module(backend: str) -> ModuleType:
    """The module implementing ``forward_sums``/``backward_grads`` for a resolved backend."""
    if backend == "triton":
        from . import scores_triton  # Triton: imported only when that backend runs

        return scores_triton
    return scores_torch


def scale_of(x: torch.Tensor) -> float:
    """The smallest power of two >= max |x_ij| (1.0 for all zeros): dividing by it is exact.

    Kept within 2^-120 .. 2^127 (float32) or 2^-1000 .. 2^1023 (float64): 1/a is a normal
    number of the dtype (subnormal data, below that, has few digits to lose anyway) and
    max |x / a| <= 2.
    """
    top = float(torch.linalg.vector_norm(x.detach(), math.inf)) if x.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    low, high = (-1000, 1023) if x.dtype == torch.float64 else (-120, 127)
    return math.ldexp(1.0, min(max(math.frexp(top)[1], low), high))


def prepare(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(centred rows of x / a, a): a = `scale_of` (x), centring anchored at the first row.

    Every entry of the result is at most 2 in magnitude, so squared norms and distances cannot
    overflow; equal rows of x give exactly equal rows (all rows equal: exactly zero).
    """
    a = scale_of(x)
    xs = x.detach() * (1.0 / a)  # a copy (never the caller's tensor), exact
    xs.sub_(xs[:1].clone())
    xs.sub_(xs.mean(0, keepdim=True))
    return xs, a


def inv_sq(sigmas: Sequence[float], scale: float, dtype: torch.dtype) -> tuple[float, ...]:
    """c_k = (scale / sigma_k)^2 in float64, clamped to [finfo.tiny, `C_MAX`] of ``dtype``."""
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    cap, tiny = C_MAX[dt], float(torch.finfo(dt).tiny)
    out = []
    for s in sigmas:
        r = scale / s  # a float division: inf past the float64 range, never ZeroDivisionError
        # at least the smallest normal number: a c that rounds to 0 in the working dtype would
        # give inf * 0 = NaN on the kernels' masked entries (D = inf)
        out.append(min(max(r * r, tiny), cap))
    return tuple(out)


_EMPTY = torch.empty(0, dtype=torch.float64)


def _work(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _SumAndGrad(torch.autograd.Function):
    """F_x for one bandwidth with its gradient computed in the forward pass (saved, scaled).

    The same scale folding and centring as `_PairSums`; the backward multiplies the saved
    dF_x/dx by the cotangent (and 1/a), and refuses a second derivative alike.
    """

    @staticmethod
    def forward(ctx, x, sigma, progress=None):
        xc, a = prepare(x)
        c = inv_sq([sigma], a, _work(x))[0]
        fx, grad = score_and_grad.sum_and_grad(xc, c, progress=progress)
        ctx.save_for_backward(grad, x)
        ctx.inv_a = 1.0 / a
        return fx.reshape(1)

    @staticmethod
    def backward(ctx, g_fx):
        grad, x = ctx.saved_tensors
        if g_fx is None:
            return None, None, None
        with torch.no_grad():
            gx = (grad.double() * (g_fx.reshape(()) * ctx.inv_a)).to(grad.dtype)
        if torch.is_grad_enabled():  # create_graph=True: refuse the second derivative
            gx, _ = _Once.apply(gx, None, x, None, g_fx)
        return gx, None, None


class _PairSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, backend, sigmas, sigma_t, want_fx, progress=None):
        impl = backend_module(backend)
        # the Triton precision mode in force now is the one the backward must use too
        prec = impl.get_precision() if backend == "triton" else None
        kw = {"precision": prec} if prec is not None else {}
        fwd_kw = {"progress": progress} if progress is not None and backend == "torch" else {}
        # centring: the kernel is translation invariant, so the gradient w.r.t. the centred data
        # equals the gradient w.r.t. the data (the centring Jacobian kills a zero-sum vector);
        # scaling by a with sigma / a leaves the sums unchanged, the gradient gets a factor 1/a
        xc, ax = prepare(x)
        tc, at = prepare(t) if t is not None else (None, 1.0)
        inv_sx2 = inv_sq(sigmas, ax, _work(x))
        inv_st2 = inv_sq([sigma_t], at, _work(t))[0] if t is not None else None
        fx, ft, fxt = impl.forward_sums(xc, tc, inv_sx2, inv_st2, want_fx, **kw, **fwd_kw)
        ctx.save_for_backward(xc, tc if tc is not None else _EMPTY, x, t if t is not None else x)
        ctx.meta = (backend, inv_sx2, inv_st2, t is not None, kw, ax, at)
        ctx.set_materialize_grads(False)
        out = [v if v is not None else _EMPTY.to(x.device) for v in (fx, ft, fxt)]
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        backend, inv_sx2, inv_st2, has_t, kw, ax, at = ctx.meta
        xc, tc, x, t = ctx.saved_tensors
        tc = tc if has_t else None
        need_x = ctx.needs_input_grad[0]
        need_t = has_t and ctx.needs_input_grad[1]
        # the empty placeholder outputs (sums not asked for) carry no gradient
        g_fx, g_ft, g_fxt = (g if g is not None and g.numel() else None for g in grads)
        if (g_fx is None and g_ft is None and g_fxt is None) or not (need_x or need_t):
            return None, None, None, None, None, None, None
        impl = backend_module(backend)
        with torch.no_grad():
            gx, gt = impl.backward_grads(
                xc, tc, inv_sx2, inv_st2, g_fx, g_ft, g_fxt, need_x=need_x, need_t=need_t,
                scale_x=1.0 / ax, scale_t=1.0 / at, **kw,
            )  # fmt: skip
        if torch.is_grad_enabled():  # create_graph=True: a second derivative may follow
            gx, gt = _Once.apply(gx, gt, x, t if has_t else None, *grads)
        return gx, gt, None, None, None, None, None


class _Once(torch.autograd.Function):
    """Passes the gradients through; differentiating them again raises a clear error."""

    @staticmethod
    def forward(ctx, gx, gt, *inputs):
        return (gx.clone() if gx is not None else None, gt.clone() if gt is not None else None)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "rkekernels scores are differentiable once: second derivatives (a double backward, "
            "a Hessian-vector product, gradgradcheck) are not supported; use the dense float64 "
            "rkekernels.reference functions for them"
        )


def pair_sums(
    x: torch.Tensor,
    t: torch.Tensor | None,
    sigmas: list[float],
    sigma_t: float | None,
    *,
    want_fx: bool = True,
    backend: str = "torch",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(F_x (K,), F_t (), F_xt (K,)) float64 with autograd; inputs are validated already.

    The forward pass reports its tiles to the callback of an enclosing `reporting` block
    (torch backend only).
    """
    progress = _PROGRESS.get()
    if (
        backend == "torch"
        and t is None
        and len(sigmas) == 1
        and want_fx
        and x.requires_grad
        and torch.is_grad_enabled()
    ):
        return _SumAndGrad.apply(x, float(sigmas[0]), progress), None, None
    fx, ft, fxt = _PairSums.apply(x, t, backend, tuple(sigmas), sigma_t, want_fx, progress)
    return (
        fx if want_fx else None,
        ft if t is not None else None,
        fxt if t is not None else None,
    )
