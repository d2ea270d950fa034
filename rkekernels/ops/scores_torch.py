"""Streaming torch path for the pair sums behind every RKE score (CPU and CUDA tensors).

Math. With centred rows x_i (translation invariance), squared norms n_i = ||x_i||^2, c_k = 1/s_k^2::

    D_ij        = max(n_i + n_j - 2 x_i . x_j, 0),   D_ii = 0 exactly
    Kx_k^2      = exp(-c_k D_ij)                    (k_s(a, b)^2 = exp(-||a - b||^2 / s^2))
    F_x[k]      = sum_ij Kx_k^2
    F_t         = sum_ij Kt^2
    F_xt[k]     = sum_ij Kx_k^2 Kt^2

Only tiles on or above the diagonal are visited; off-diagonal tiles count twice. Within a tile
the arithmetic (and the sum over the tile) is in the input dtype; tile sums are accumulated
across tiles in float64 (a float32 sum of one tile has relative error ~1e-7).
The distance tile is computed once and shared by every bandwidth and by all three sums.

Several bandwidths (`power_plan`). The exponentials are taken in ascending order of c_k; where
c_k = 2 c_prev (a half-octave grid of sigmas, the report's sweep) the tile is squared in place,
exp(-2 c D) = exp(-c D)^2, instead of taking a new exp, at most ``MAX_SQUARINGS`` times in a
row (each squaring doubles the relative rounding error of the exp it starts from: <= 2^3 x
6e-8 in float32, within SPEC's 1e-5); equal c_k share one tile.

Gradient (streamed the same way). For cotangents g of the sums, the combined symmetric weight
W_ij = sum_k 4 c_k (g_x[k] Kx_k^2 + g_xt[k] Kx_k^2 Kt^2) gives::

    dL/dx_i = -sum_j W_ij (x_i - x_j) = -(r_i x_i - G_i),   r_i = sum_j W_ij,  G_i = sum_j W_ij x_j

and likewise for t with W^t_ij = 4 c_t (g_t Kt^2 + sum_k g_xt[k] Kx_k^2 Kt^2). Each tile adds to
r and G of its rows and, when off the diagonal, of its columns (W^T).

Memory: O(n d) for the inputs plus one tile of block_rows x block_cols per live temporary.

Progress. `forward_sums` takes ``progress(pairs_done, pairs_total)``: called once with
``pairs_done = 0`` and then after every tile, counting the kernel entries computed (the tiles'
areas, `tile_pairs`: about n^2 / 2 + n block_rows / 2), so a rate in pairs/s gives a real
time estimate. The Triton path (``ops.scores_triton``) is one kernel launch and reports nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "BLOCK_COLS",
    "BLOCK_ROWS",
    "MAX_SQUARINGS",
    "add_row_col_sums",
    "backward_grads",
    "block_sums",
    "floored_exp_",
    "forward_sums",
    "neg_sqdist",
    "power_plan",
    "row_sums",
    "sq_norms",
    "tile_pairs",
    "tiles",
]

BLOCK_ROWS = 1024
BLOCK_COLS = 1024
#: the longest run of squarings in `power_plan` before a fresh exp
MAX_SQUARINGS = 3


@functools.cache
def _exp_floor(dtype: torch.dtype) -> tuple[float, float]:
    lo = math.log(torch.finfo(dtype).tiny) + 0.25
    return lo, float(torch.tensor(lo, dtype=dtype).exp())


def floored_exp_(t: torch.Tensor) -> torch.Tensor:
    """exp(t) in place for t <= 0 (any shape), with the results below exp(lo) set to 0.

    lo = log(tiny) + 0.25 of t's dtype (-87.1 in float32, -708.1 in float64). The argument is
    clamped at lo, exponentiated, and exp(lo) (1.5e-38 in float32) subtracted: a result that
    would be subnormal or underflow is exactly 0, as a plain exp's underflow is, and every
    other result moves by at most exp(lo) (below one float32 rounding of any term >= 1e-30).
    Why: the CPU exp takes a slow path (about 10x) for results below the smallest normal
    number, which wide tiles at narrow bandwidths hit for most pairs.

    Example:
        >>> floored_exp_(torch.tensor([0.0, -1000.0])).tolist()
        [1.0, 0.0]
    """
    lo, floor = _exp_floor(t.dtype)
    return t.clamp_(min=lo).exp_().sub_(floor)


def power_plan(inv_sx2: Sequence[float]) -> list[tuple[int, str]]:
    """The order and the operation of each bandwidth's tile exp(-c_k D): (k, op) in ascending c.

    op is "exp" (a new exponential), "square" (c_k = 2 c_prev to 1e-12: the previous tile
    squared, at most MAX_SQUARINGS in a row) or "same" (c_k = c_prev: the previous tile as is).

    Example:
        >>> power_plan([1.0, 0.5, 2.0, 0.5, 3.0])
        [(1, 'exp'), (3, 'same'), (0, 'square'), (2, 'square'), (4, 'exp')]
    """
    order = sorted(range(len(inv_sx2)), key=lambda k: inv_sx2[k])
    plan: list[tuple[int, str]] = []
    run = 0
    for k in order:
        c = float(inv_sx2[k])
        prev = float(inv_sx2[plan[-1][0]]) if plan else None
        if prev is not None and c == prev:
            plan.append((k, "same"))
        elif prev is not None and abs(c - 2.0 * prev) <= 1e-12 * c and run < MAX_SQUARINGS:
            run += 1
            plan.append((k, "square"))
        else:
            run = 0
            plan.append((k, "exp"))
    return plan


def tiles(
    n: int,
    block_rows: int | None = None,
    block_cols: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, int, int, bool]]:
    """The tiles covering the upper triangle of an n x n matrix, as (i0, i1, j0, j1, diagonal).

    For each row block [i0, i1) the first tile is the square diagonal block (counted once, it
    holds both orders of its pairs), then column blocks [j0, j1) to the right (counted twice).
    ``shard=(rank, world)`` keeps every world-th tile starting at rank (for distributed use).
    """
    block_rows = block_rows or BLOCK_ROWS
    block_cols = block_cols or BLOCK_COLS
    idx = 0
    for i0 in range(0, n, block_rows):
        i1 = min(i0 + block_rows, n)
        spans = [(i0, i1, True)]
        spans += [(j0, min(j0 + block_cols, n), False) for j0 in range(i1, n, block_cols)]
        for j0, j1, diag in spans:
            if shard is None or idx % shard[1] == shard[0]:
                yield i0, i1, j0, j1, diag
            idx += 1


def tile_pairs(
    n: int,
    block_rows: int | None = None,
    block_cols: int | None = None,
    shard: tuple[int, int] | None = None,
) -> int:
    """The kernel entries the `tiles` of an n x n matrix cover: the sum of their areas.

    Row block [i0, i1) spans the columns [i0, n) (its diagonal square, then the blocks to the
    right), so without ``shard`` the total is ``sum over row blocks of (i1 - i0) (n - i0)``,
    O(n / block_rows) to compute: n (n + 1) / 2 plus the strict lower halves of the diagonal
    squares. With ``shard`` it sums the areas of that shard's tiles.

    Example:
        >>> tile_pairs(10, 4, 4)  # 4 * 10 + 4 * 6 + 2 * 2
        68
    """
    block_rows = block_rows or BLOCK_ROWS
    if shard is not None:
        return sum(
            (i1 - i0) * (j1 - j0) for i0, i1, j0, j1, _ in tiles(n, block_rows, block_cols, shard)
        )
    return sum((min(i0 + block_rows, n) - i0) * (n - i0) for i0 in range(0, n, block_rows))


class _Workspace:
    """Tile buffers allocated once per call and reused for every tile (no per-tile malloc)."""

    def __init__(self, like: torch.Tensor, rows: int, cols: int):
        self._like, self._size, self._bufs = like, rows * cols, {}

    def __call__(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = self._like.new_empty(self._size)
        return buf[: rows * cols].view(rows, cols)


def sq_norms(v: torch.Tensor) -> torch.Tensor:
    """||v_i||^2 per row, as a batched dot product (no (n, d) temporary)."""
    return torch.einsum("ij,ij->i", v, v)


def neg_sqdist(
    a, na, b, nb, diag: bool, out: torch.Tensor | None = None, diag_value: float = 0.0
) -> torch.Tensor:
    """-max(||a_i - b_j||^2, 0) as one GEMM with the norms folded in: 2 a.b - n_b, then - n_a.

    On a diagonal tile the diagonal is set to ``diag_value`` (0: the distance of a point to
    itself; -inf in the backward pass, where W_ii = 0 exactly instead of cancelling).
    """
    neg = torch.addmm(nb.unsqueeze(0), a, b.t(), beta=-1.0, alpha=2.0, out=out)
    neg.sub_(na.unsqueeze(1)).clamp_(max=0.0)
    if diag:
        neg.diagonal().fill_(diag_value)
    return neg


def forward_sums(
    xc: torch.Tensor,
    tc: torch.Tensor | None,
    inv_sx2: Sequence[float],
    inv_st2: float | None,
    want_fx: bool = True,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    shard: tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(F_x (K,), F_t (), F_xt (K,)) in float64 for centred ``xc`` (n, d) and ``tc`` (n, m).

    ``inv_sx2`` holds c_k = 1/sigma_k^2; F_t and F_xt are None without ``tc``, F_x is None when
    ``want_fx`` is False. ``shard`` restricts the sum to a subset of tiles (see `tiles`).

    ``progress(pairs_done, pairs_total)``, when given, is called with ``(0, total)`` before the
    first tile and after each tile with the kernel entries computed so far; ``pairs_total`` is
    `tile_pairs` (n, block_rows, block_cols, shard), the last call has ``pairs_done ==
    pairs_total``. None (the default) costs nothing. On CUDA the tiles are queued
    asynchronously, so the count runs ahead of the device by at most the launch queue. The
    Triton backend takes no callback (one launch).

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [100.0], [200.0]])
        >>> seen = []
        >>> fx, _, _ = forward_sums(x - x.mean(0), None, (1.0,), None, block_rows=2,
        ...                         block_cols=2, progress=lambda done, total: seen.append(done))
        >>> fx.tolist(), seen  # tiles [0:2]x[0:2] (4 entries), [0:2]x[2:3] (2), [2:3]x[2:3] (1)
        ([3.0], [0, 4, 6, 7])
    """
    n = xc.shape[0]
    K = len(inv_sx2)
    nx = sq_norms(xc)
    nt = sq_norms(tc) if tc is not None else None
    out = torch.zeros(2 * K + 1, dtype=torch.float64, device=xc.device)
    br, bc = block_rows or BLOCK_ROWS, block_cols or BLOCK_COLS
    ws = _Workspace(xc, min(n, max(br, bc)), min(n, max(br, bc)))
    has_t = tc is not None
    done, total = 0, 0
    if progress is not None:
        total = tile_pairs(n, br, bc, shard)
        progress(0, total)
    for i0, i1, j0, j1, diag in tiles(n, br, bc, shard):
        block_sums(
            out, 1.0 if diag else 2.0, xc[i0:i1], nx[i0:i1], xc[j0:j1], nx[j0:j1], diag,
            inv_sx2, tc[i0:i1] if has_t else None, nt[i0:i1] if has_t else None,
            tc[j0:j1] if has_t else None, nt[j0:j1] if has_t else None, inv_st2,
            want_fx=want_fx, ws=ws,
        )  # fmt: skip
        if progress is not None:
            done += (i1 - i0) * (j1 - j0)
            progress(done, total)
    fx = out[:K].clone() if want_fx else None
    ft = out[K].clone() if has_t else None
    fxt = out[K + 1 :].clone() if has_t else None
    return fx, ft, fxt


def block_sums(
    out: torch.Tensor,
    weight: float,
    xa: torch.Tensor,
    na: torch.Tensor,
    xb: torch.Tensor,
    nb: torch.Tensor,
    diag: bool,
    inv_sx2: Sequence[float],
    ta: torch.Tensor | None = None,
    nta: torch.Tensor | None = None,
    tb: torch.Tensor | None = None,
    ntb: torch.Tensor | None = None,
    inv_st2: float | None = None,
    *,
    want_fx: bool = True,
    ws: _Workspace | None = None,
    add: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Add one block of pairs (rows a of A, b of B) to ``out`` = [F_x (K), F_t, F_xt (K)]::

        out[k]         += w sum_ab exp(-c_k ||x_a - x_b||^2)
        out[K]         += w sum_ab exp(-c_t ||t_a - t_b||^2)                  (with t)
        out[K + 1 + k] += w sum_ab exp(-c_k ||x_a - x_b||^2 - c_t ||t_a - t_b||^2)

    The one tile body of every pair sum (the scores' triangle, the metric's cross blocks, the
    per-sample sums): one GEMM per tile for the distances (norms ``na``, ``nb`` folded in;
    ``diag``: the block is on the diagonal, D_aa = 0 exactly), shared by every bandwidth and the
    three sums. The arithmetic and each tile's sum are in the input dtype, added into the
    float64 ``out``. ``add(slot, tile)`` replaces that reduction (``out`` is then unused: the
    per-sample sums add row and column sums instead). ``ws`` reuses tile buffers across calls;
    without it each tile allocates.
    """
    K = len(inv_sx2)
    shape = (xa.shape[0], xb.shape[0])
    if add is None:

        def add(slot: int, tile: torch.Tensor) -> None:
            out[slot] += weight * tile.sum().double()

    def buf(name: str) -> torch.Tensor | None:
        return ws(name, *shape) if ws is not None else None

    negd = neg_sqdist(xa, na, xb, nb, diag, buf("d"))
    if K == 1 and ta is None and want_fx:  # one sum: exponentiate the distance tile in place
        add(0, floored_exp_(negd.mul_(inv_sx2[0])))
        return
    kt2 = None
    if ta is not None:
        kt2 = floored_exp_(neg_sqdist(ta, nta, tb, ntb, diag, buf("t")).mul_(inv_st2))
        add(K, kt2)
    e = buf("e")
    for k, op in power_plan(inv_sx2) if K > 1 else [(0, "exp")]:
        if op == "exp":
            e = floored_exp_(torch.mul(negd, inv_sx2[k], out=e))
        elif op == "square":
            e.mul_(e)
        if want_fx:
            add(k, e)
        if kt2 is not None:
            add(K + 1 + k, torch.mul(e, kt2, out=buf("et")))


def add_row_col_sums(
    acc: torch.Tensor, tile: torch.Tensor, i0: int, j0: int, diag: bool, ones: torch.Tensor
) -> None:
    """acc[i0 + a] += sum_b tile[a, b] and, off the diagonal, acc[j0 + b] += sum_a tile[a, b].

    Two GEMVs in the tile's dtype (a float32 tile row of <= 1,024 positive terms: relative
    error ~1e-7), added into the float64 ``acc`` (n,): an order of magnitude faster than a
    float64 reduction of the tile.
    """
    r, c = tile.shape
    acc[i0 : i0 + r] += torch.mv(tile, ones[:c])
    if not diag:
        acc[j0 : j0 + c] += torch.mv(tile.t(), ones[:r])


def row_sums(
    xc: torch.Tensor,
    tc: torch.Tensor | None,
    inv_sx2: Sequence[float],
    inv_st2: float | None,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-sample sums, float64: (s_x (K, n), s_t (n,), s_xt (K, n)), no gradient.

    s_x[k, i] = sum_j Kx_k[i, j]^2,  s_t[i] = sum_j Kt[i, j]^2,  s_xt[k, i] = sum_j Kx_k^2 Kt^2
    (diagonal included, so each is >= 1; summed over i they give `forward_sums`). The same tiles
    as `forward_sums` (upper triangle, one GEMM each); an off-diagonal tile adds its row sums to
    its rows and its column sums to its columns. O(n) extra memory; s_t, s_xt are None without
    ``tc``. ``shard=(rank, world)`` visits only that rank's tiles (see `tiles`): the partial sums
    of all ranks add up to the whole (`rkekernels.evaluation.ranks`).
    """
    n = xc.shape[0]
    K = len(inv_sx2)
    nx = sq_norms(xc)
    nt = sq_norms(tc) if tc is not None else None
    has_t = tc is not None
    acc = torch.zeros(2 * K + 1, n, dtype=torch.float64, device=xc.device)  # [s_x, s_t, s_xt]
    br, bc = block_rows or BLOCK_ROWS, block_cols or BLOCK_COLS
    ws = _Workspace(xc, min(n, max(br, bc)), min(n, max(br, bc)))
    ones = xc.new_ones(min(n, max(br, bc)))
    for i0, i1, j0, j1, diag in tiles(n, br, bc, shard):

        def add(slot: int, tile: torch.Tensor, i0=i0, i1=i1, j0=j0, j1=j1, diag=diag) -> None:
            add_row_col_sums(acc[slot], tile, i0, j0, diag, ones)

        block_sums(
            acc, 1.0, xc[i0:i1], nx[i0:i1], xc[j0:j1], nx[j0:j1], diag, inv_sx2,
            tc[i0:i1] if has_t else None, nt[i0:i1] if has_t else None,
            tc[j0:j1] if has_t else None, nt[j0:j1] if has_t else None, inv_st2, ws=ws, add=add,
        )  # fmt: skip
    sx = acc[:K]
    st = acc[K] if has_t else None
    sxt = acc[K + 1 :] if has_t else None
    return sx, st, sxt


def backward_grads(
    xc: torch.Tensor,
    tc: torch.Tensor | None,
    inv_sx2: Sequence[float],
    inv_st2: float | None,
    g_fx: torch.Tensor | None,
    g_ft: torch.Tensor | None,
    g_fxt: torch.Tensor | None,
    need_x: bool = True,
    need_t: bool = True,
    *,
    scale_x: float = 1.0,
    scale_t: float = 1.0,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Vector-Jacobian products of `forward_sums`: (dL/dx (n, d), dL/dt (n, m) or None).

    ``g_fx`` (K,), ``g_ft`` (), ``g_fxt`` (K,) are the float64 cotangents (None means zero).
    Gradients are accumulated in float64, multiplied by ``scale_x`` / ``scale_t`` (the chain
    rule of a scaling done by the caller) and returned in the input dtype. The weights' scalar
    coefficients 4 c g are divided by their largest magnitude before they meet the tiles (so a
    huge c times a large cotangent cannot overflow the input dtype) and that factor goes back in
    float64 at the end; W_ii = 0 exactly.
    """
    n = xc.shape[0]
    dt = xc.dtype
    has_t = tc is not None
    need_t = need_t and has_t
    nx = sq_norms(xc)
    nt = sq_norms(tc) if has_t else None
    # per-bandwidth scalar weights, kept on device (no host sync)
    # coefficients 4 c g as (c / c_max) (g / g_max) 4: at most 4 in magnitude, so huge c or g
    # cannot overflow the tiles; c_max and g_max multiply the result at the end, one at a time
    # (a zero gradient stays 0 even where c_max g_max alone would overflow)
    c_max = max(inv_sx2)
    c = torch.tensor([v / c_max for v in inv_sx2], dtype=torch.float64, device=xc.device)
    gx_max = _top(g_fx, g_fxt if has_t else None)
    gt_max = _top(g_ft, g_fxt)
    # each is None when its term does not reach a gradient that is asked for
    ax = 4.0 * c * (g_fx / gx_max) if (g_fx is not None and need_x) else None  # Kx_k^2 in W^x
    axt = 4.0 * c * (g_fxt / gx_max) if (g_fxt is not None and has_t and need_x) else None
    bt = 4.0 * (g_ft / gt_max) if (g_ft is not None and need_t) else None  # of Kt^2 in W^t
    bxt = 4.0 * (g_fxt / gt_max) if (g_fxt is not None and need_t) else None  # Kx^2 Kt^2, W^t
    ax, axt, bt, bxt = (None if v is None else v.to(dt) for v in (ax, axt, bt, bxt))
    use_kx = ax is not None or axt is not None or bxt is not None  # else skip the K exps

    rx = torch.zeros(n, dtype=torch.float64, device=xc.device) if need_x else None
    gx = torch.zeros(xc.shape, dtype=torch.float64, device=xc.device) if need_x else None
    rt = torch.zeros(n, dtype=torch.float64, device=xc.device) if need_t else None
    gt = torch.zeros(tc.shape, dtype=torch.float64, device=xc.device) if need_t else None

    def _accumulate(wt, r, g, v, i0, i1, j0, j1, diag):
        r[i0:i1] += wt.sum(1).double()
        g[i0:i1] += (wt @ v[j0:j1]).double()
        if not diag:
            r[j0:j1] += wt.sum(0).double()
            g[j0:j1] += (wt.t() @ v[i0:i1]).double()

    br, bc = block_rows or BLOCK_ROWS, block_cols or BLOCK_COLS
    ws = _Workspace(xc, min(n, max(br, bc)), min(n, max(br, bc)))
    for i0, i1, j0, j1, diag in tiles(n, br, bc):
        shape = (i1 - i0, j1 - j0)
        ninf = -math.inf
        negd = neg_sqdist(xc[i0:i1], nx[i0:i1], xc[j0:j1], nx[j0:j1], diag, ws("d", *shape), ninf)
        kt2 = None
        if has_t:
            kt2 = neg_sqdist(
                tc[i0:i1], nt[i0:i1], tc[j0:j1], nt[j0:j1], diag, ws("t", *shape), ninf
            )
            kt2 = kt2.mul_(inv_st2).exp_()
        wx = ws("wx", *shape).zero_() if need_x else None
        wt = None
        if need_t:
            wt = ws("wt", *shape)
            if bt is not None:
                torch.mul(kt2, bt, out=wt)
            else:
                wt.zero_()
        for k, ck in enumerate(inv_sx2 if use_kx else ()):
            e = torch.mul(negd, ck, out=ws("e", *shape)).exp_()
            if ax is not None:
                wx.addcmul_(e, ax[k])
            if axt is not None or bxt is not None:
                ekt = e.mul_(kt2)
                if axt is not None:
                    wx.addcmul_(ekt, axt[k])
                if bxt is not None:
                    wt.addcmul_(ekt, bxt[k])
        if need_x:
            _accumulate(wx, rx, gx, xc, i0, i1, j0, j1, diag)
        if need_t:
            _accumulate(wt, rt, gt, tc, i0, i1, j0, j1, diag)

    grad_x = grad_t = None
    if need_x:
        grad_x = ((gx - rx.unsqueeze(1) * xc.double()) * c_max * gx_max * scale_x).to(dt)
    if need_t:
        grad_t = ((gt - rt.unsqueeze(1) * tc.double()) * inv_st2 * gt_max * scale_t).to(dt)
    return grad_x, grad_t


def _top(*coefs: torch.Tensor | None) -> torch.Tensor | float:
    """The largest |coefficient| (1 where all are zero or absent), kept on the device."""
    present = [v.abs().max() for v in coefs if v is not None]
    if not present:
        return 1.0
    top = torch.stack(present).max()
    return torch.where(top > 0, top, torch.ones_like(top))
