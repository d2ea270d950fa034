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
exp (shared by the sum and both sides of the symmetric tile), then K2 @ x_j into the rows' G and
K2^T @ x_i into the columns' G: 3 GEMMs per tile of the triangle, 1.5 GEMM-equivalents of
x @ x.T in all, where the forward then the streamed backward take 4 (2 of them recomputing the
same distances). r and G are accumulated in float64 across tiles (per-tile arithmetic in the
input dtype), like the two-pass path. Extra memory: G (n, d) float64 and one tile per buffer.

Used by ``ops.pair_sums`` for the torch backend when one bandwidth and no prompts are asked for
and a gradient will be taken; everything else runs the forward, then ``scores_torch``'s
streamed backward.
"""

from __future__ import annotations

import torch

from . import scores_torch
from .scores_torch import neg_sqdist, sq_norms, tiles

__all__ = ["sum_and_grad"]


def sum_and_grad(
    xc: torch.Tensor,
    inv_s2: float,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_x (), dF_x/dx (n, d)) for centred ``xc`` and c = ``inv_s2``: F_x in float64, the
    gradient in the input dtype (accumulated in float64).

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
    r = torch.zeros(n, dtype=torch.float64, device=xc.device)
    g = torch.zeros((n, d), dtype=torch.float64, device=xc.device)
    br = block_rows or scores_torch.BLOCK_ROWS  # the torch path's tiles (tests shrink them)
    bc = block_cols or scores_torch.BLOCK_COLS
    size = min(n, max(br, bc))
    tile = xc.new_empty(size * size)
    part = xc.new_empty(size * d)
    for i0, i1, j0, j1, diag in tiles(n, br, bc):
        rows, cols = i1 - i0, j1 - j0
        xi, xj = xc[i0:i1], xc[j0:j1]
        k2 = neg_sqdist(xi, nx[i0:i1], xj, nx[j0:j1], diag, tile[: rows * cols].view(rows, cols))
        k2.mul_(inv_s2).exp_()
        if diag:  # the diagonal adds exactly 1 per row to F_x and nothing to the gradient
            k2.diagonal().zero_()
        r[i0:i1] += k2.sum(1)
        g[i0:i1] += torch.mm(k2, xj, out=part[: rows * d].view(rows, d))
        if not diag:
            r[j0:j1] += k2.sum(0)
            g[j0:j1] += torch.mm(k2.t(), xi, out=part[: cols * d].view(cols, d))
    grad = (g.sub_(r.unsqueeze(1) * xc)).mul_(4.0 * inv_s2).to(dt)
    return r.sum() + n, grad
