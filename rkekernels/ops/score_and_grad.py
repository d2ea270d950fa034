"""One pass for F_x and its gradient together: the forward + backward of `rke_score` fused.

Math (as ``ops.scores_torch``). Centred rows x_i, one bandwidth, c = 1/sigma^2::

    K2_ij  = exp(-c D_ij),   D_ij = max(||x_i||^2 + ||x_j||^2 - 2 x_i . x_j, 0),  D_ii = 0
    F_x    = n + sum_i r_i,                   r_i = sum_{j != i} K2_ij
    dF_x / dx_i = 4 c sum_j K2_ij (x_j - x_i) = 4 c (G_i - r_i x_i),   G_i = sum_{j != i} K2_ij x_j

(the diagonal, K2_ii = 1 exactly, is counted in F_x and left out of r and G, as W_ii = 0 in the
streamed backward: no rounding of x_i - x_i).

So the gradient does not depend on the cotangent except for a scalar factor: a caller that will
differentiate (``x.requires_grad`` under grad mode) gets F_x and dF_x/dx from one visit of the
upper triangle, and the backward is one scaling. Per tile: one GEMM for the distances, one
exp (shared by the sum and both sides of the symmetric tile), then K2 @ [x_j, 1] into the rows'
[G, r] and K2^T @ [x_i, 1] into the columns' (the ones column makes the row sums part of the
GEMM, no separate reductions): 3 GEMMs per tile of the triangle, 1.5 GEMM-equivalents of
x @ x.T in all, where the forward then the streamed backward take 4 (2 of them recomputing the
same distances). The GEMMs accumulate in the input dtype over at most `FLUSH` tiles, then into
float64 totals. Extra memory: [G, r] (n, d + 16) in float64 and in the input dtype, [x, 1], and
one tile.

Used by ``ops.pair_sums`` for the torch backend when one bandwidth and no prompts are asked for
and a gradient will be taken; everything else runs the forward, then ``scores_torch``'s
streamed backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import scores_torch
from .scores_torch import floored_exp_, neg_sqdist, sq_norms

__all__ = ["FLUSH", "sum_and_grad"]

#: Tile products summed in the input dtype before they are added into the float64 totals (as
#: the two-pass path adds each tile's product in float64, within the same error bound order).
FLUSH = 8

# columns added to [x, 1]: the GEMM operands stay 64-byte aligned rows for d a multiple of 16
_PAD = 16


def sum_and_grad(
    xc: torch.Tensor,
    inv_s2: float,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_x (), dF_x/dx (n, d)) for centred ``xc`` and c = ``inv_s2``: F_x in float64, the
    gradient in the input dtype (accumulated in float64).

    ``progress(pairs_done, pairs_total)``: as in `scores_torch.forward_sums` (the same tiles,
    the same count, `scores_torch.tile_pairs`); None costs nothing.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> fx, g = sum_and_grad(x - x.mean(0), 1.0)
        >>> round(float(fx), 4), [round(v, 4) for v in g.flatten().tolist()]  # 2 + 2 exp(-1)
        (2.7358, [1.4715, -1.4715])
    """
    n, d = xc.shape
    dt = xc.dtype
    nx = sq_norms(xc)
    br = block_rows or scores_torch.BLOCK_ROWS  # the torch path's tiles (tests shrink them)
    bc = block_cols or scores_torch.BLOCK_COLS
    w = d + _PAD
    # [x, 1, 0...]: one GEMM K2 @ xa gives G (the first d columns) and r (column d) together
    xa = xc.new_zeros((n, w))
    xa[:, :d] = xc
    xa[:, d] = 1.0
    acc = xc.new_zeros((n, w))  # partial sums in the input dtype, flushed into g (float64)
    g = torch.zeros((n, w), dtype=torch.float64, device=xc.device)
    size = min(n, max(br, bc))
    tile = xc.new_empty(size * size)
    done, total = 0, 0
    if progress is not None:
        total = scores_torch.tile_pairs(n, br, bc)
        progress(0, total)
    for bi, i0 in enumerate(range(0, n, br)):
        i1 = min(i0 + br, n)
        xi, ai = xc[i0:i1], xa[i0:i1]
        spans = [(i0, i1)] + [(j0, min(j0 + bc, n)) for j0 in range(i1, n, bc)]
        for k, (j0, j1) in enumerate(spans):
            rows, cols = i1 - i0, j1 - j0
            diag = k == 0
            k2 = neg_sqdist(
                xi, nx[i0:i1], xc[j0:j1], nx[j0:j1], diag, tile[: rows * cols].view(rows, cols)
            )
            floored_exp_(k2.mul_(inv_s2))
            if diag:  # the diagonal adds exactly 1 per row to F_x and nothing to the gradient
                k2.diagonal().zero_()
            acc[i0:i1].addmm_(k2, xa[j0:j1])  # rows: [G_i, r_i] += K2 [x_j, 1]
            if not diag:
                acc[j0:j1].addmm_(k2.t(), ai)  # columns, by symmetry: K2^T [x_i, 1]
            if (k + 1) % FLUSH == 0:
                g[i0:i1] += acc[i0:i1]
                acc[i0:i1].zero_()
            if progress is not None:
                done += rows * cols
                progress(done, total)
        # these rows are complete (later row blocks only reach columns to their right); the
        # columns further right get one term per row block: flushed every FLUSH row blocks
        g[i0:i1] += acc[i0:i1]
        if (bi + 1) % FLUSH == 0:
            g[i1:] += acc[i1:]
            acc[i1:].zero_()
    r = g[:, d]
    grad = (g[:, :d].sub_(r.unsqueeze(1) * xc)).mul_(4.0 * inv_s2).to(dt)
    return r.sum() + n, grad
