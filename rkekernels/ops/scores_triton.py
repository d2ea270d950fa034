"""Fused Triton kernels for the pair sums behind every RKE score, forward and backward.

Math (as ``ops.scores_torch``). Centred rows x_i, c_k = 1/sigma_k^2, all ordered pairs::

    D_ij    = max(||x_i||^2 + ||x_j||^2 - 2 x_i . x_j, 0),   D_ii = 0 exactly
    F_x[k]  = sum_ij exp(-c_k D_ij)                 (= sum_ij Kx_k^2)
    F_t     = sum_ij exp(-c_t Dt_ij)                (= sum_ij Kt^2)
    F_xt[k] = sum_ij exp(-c_k D_ij - c_t Dt_ij)     (= sum_ij Kx_k^2 Kt^2)

Gradient (vector-Jacobian product). For cotangents g of the sums, the symmetric weights::

    W_ij  = sum_k 4 c_k Kx_k^2 (g_x[k] + g_xt[k] Kt^2)          (i != j, W_ii = 0)
    Wt_ij = 4 c_t Kt^2 (g_t + sum_k g_xt[k] Kx_k^2)
    dL/dx_i = sum_j W_ij (x_j - x_i) = G_i - r_i x_i,   G_i = sum_j W_ij x_j,  r_i = sum_j W_ij

and likewise dL/dt with Wt and t.

Forward kernel. Square tiles of ``BLOCK`` rows; only tiles on or above the diagonal are visited
(off-diagonal tiles count twice). The tiles are grouped in bands of ``GROUP`` column blocks;
one program takes one row block of one band and walks the band's (at most ``GROUP``) column
tiles, so the programs running together share the column blocks of a band and the row blocks
in L2. Per tile: ``x_i . x_j`` with ``tl.dot`` over chunks of ``BLOCK_D`` features, the squared
norms from the same loaded chunks, then exp2 (log2(e) folded into c on the host) and the tile
sums, one distance tile shared by every bandwidth and by the three sums. Arithmetic inside a
tile is float32 (float64 for float64 input); each program adds its tile sums in float64 and
writes them to its own row of a partials buffer that torch sums in float64. Deterministic, no
atomics. The diagonal is set to D = 0 exactly; rows past n get D = inf, so they add exp(-inf) = 0.

Backward kernel. One program per block of ``BLOCK_M`` rows walks ALL column blocks (the full
square, not the triangle), builds W (and Wt) for the tile and accumulates r_i in float64
registers and G_i = W x_j into a float64 scratch row block that only this program touches.
Visiting the full square computes each off-diagonal distance tile twice (2 dots per tile over
n^2 tiles = 2 n^2 d multiply-adds, vs 1.5 n^2 d for the triangle with column scatter), but
needs no atomics: the triangle would have to scatter W^T x_i into the (BLOCK_N, d) column
blocks of G with float64 atomics from every tile, which is slower than the 33% extra dot work
on a GPU and nondeterministic. The epilogue writes dL/dx_i = G_i - r_i x_i in the input dtype.

Precision modes and their error bounds: `rkekernels.ops.triton_precision` (re-exported here);
tile configurations: `rkekernels.ops.triton_tuning`. The derivation of the bounds, and where each
part has been verified, is on the numerics page (docs/numerics.md, "Triton score kernels").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .launch import launches_on_input
from .triton_precision import (
    PRECISIONS,
    Plan,
    check_precision,
    error_bound,
    get_precision,
    precision,
    set_precision,
)
from .triton_tuning import check_device, config, interpreted, next_pow2, tuned_configs

__all__ = [
    "NO_SPECIALIZE",
    "PRECISIONS",
    "backward_grads",
    "check_device",
    "error_bound",
    "forward_sums",
    "get_precision",
    "interpreted",
    "precision",
    "set_precision",
    "tuned_configs",
]

_LOG2E = math.log2(math.e)

_INF: tl.constexpr = tl.constexpr(float("inf"))


# --------------------------------------------------------------------------- kernels


@triton.jit
def _band_row(pid, GROUP: tl.constexpr):
    """Program id -> (band p, row block bi): band p holds G (p + 1) rows' worth of programs."""
    q = pid // GROUP
    p = ((tl.sqrt((8 * q + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    p = tl.where((p + 1) * (p + 2) // 2 <= q, p + 1, p)
    p = tl.where(p * (p + 1) // 2 > q, p - 1, p)
    bi = pid - GROUP * (p * (p + 1) // 2)
    return p, bi


@triton.jit
def _sqdist_tile(
    X,
    NX,
    stride,
    d,
    o_i,
    m_i,
    o_j,
    m_j,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ACC: tl.constexpr,
):
    """max(||x_i||^2 + ||x_j||^2 - 2 x_i.x_j, 0) for a tile; +inf where row or column >= n."""
    b_dot = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    o_d = tl.arange(0, BLOCK_D)
    p_i = X + o_i.to(tl.int64)[:, None] * stride + o_d[None, :]
    p_j = X + o_j.to(tl.int64)[:, None] * stride + o_d[None, :]
    for d0 in range(0, d, BLOCK_D):
        m_d = (d0 + o_d) < d
        b_a = tl.load(p_i + d0, mask=m_i[:, None] & m_d[None, :], other=0.0)
        b_b = tl.load(p_j + d0, mask=m_j[:, None] & m_d[None, :], other=0.0)
        b_dot = tl.dot(b_a, tl.trans(b_b), b_dot, input_precision=DOT_PREC, out_dtype=ACC)
    b_ni = tl.load(NX + o_i, mask=m_i, other=_INF)
    b_nj = tl.load(NX + o_j, mask=m_j, other=_INF)
    return tl.maximum(b_ni[:, None] + b_nj[None, :] - 2.0 * b_dot, 0.0)


#: Integer arguments that must not create a compiled variant per value (Triton specialises
#: integers equal to 1 and multiples of 16): the row count and the shard. Widths and strides
#: keep their specialisation (aligned rows give vector loads).
NO_SPECIALIZE = ("n", "shard_rank", "shard_world")


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(
    X,
    T,
    NX,
    NT,
    C,
    CT,
    PART,
    n,
    d,
    m,
    stride_x,
    stride_t,
    shard_rank,
    shard_world,
    K: tl.constexpr,
    NSP: tl.constexpr,
    HAS_T: tl.constexpr,
    WANT_FX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
):
    # partial sums of this program: slot k = F_x[k], slot K = F_t, slot K + 1 + k = F_xt[k].
    # A shard (rank r of w) runs the programs r, r + w, r + 2w, ... of the whole grid.
    i_l = tl.program_id(0)
    i_p = i_l * shard_world + shard_rank
    p, bi = _band_row(i_p, GROUP)
    nb = tl.cdiv(n, BLOCK)
    j_lo = tl.maximum(bi, p * GROUP)
    j_hi = tl.minimum(p * GROUP + GROUP, nb)
    o_i = bi * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < n
    o_s = tl.arange(0, NSP)
    b_acc = tl.zeros([NSP], dtype=tl.float64)
    for bj in range(j_lo, j_hi):
        o_j = bj * BLOCK + tl.arange(0, BLOCK)
        m_j = o_j < n
        b_diag = o_i[:, None] == o_j[None, :]
        b_zero = tl.where(m_i, 0.0, _INF)[:, None]  # the diagonal: D = 0 (inf past n)
        w = tl.where(bj == bi, 1.0, 2.0)  # off-diagonal tiles hold both orders of their pairs
        b_dx = _sqdist_tile(
            X, NX, stride_x, d, o_i, m_i, o_j, m_j, BLOCK, BLOCK, BLOCK_D, DOT_PREC, ACC
        )
        b_dx = tl.where(b_diag, b_zero, b_dx)
        if HAS_T:
            b_dt = _sqdist_tile(
                T, NT, stride_t, m, o_i, m_i, o_j, m_j, BLOCK, BLOCK, BLOCK_D, DOT_PREC, ACC
            )
            b_dt = tl.where(b_diag, b_zero, b_dt)
            b_et = tl.exp2(b_dt * (-tl.load(CT)))
            s_t = w * tl.sum(tl.sum(b_et, 1), 0)
            b_acc += tl.where(o_s == K, s_t.to(tl.float64), 0.0)
        for k in tl.static_range(K):
            b_e = tl.exp2(b_dx * (-tl.load(C + k)))
            if WANT_FX:
                s_x = w * tl.sum(tl.sum(b_e, 1), 0)
                b_acc += tl.where(o_s == k, s_x.to(tl.float64), 0.0)
            if HAS_T:
                s_xt = w * tl.sum(tl.sum(b_e * b_et, 1), 0)
                b_acc += tl.where(o_s == K + 1 + k, s_xt.to(tl.float64), 0.0)
    tl.store(PART + i_l.to(tl.int64) * NSP + o_s, b_acc)


@triton.jit
def _round_mantissa(b_w, W_ROUND: tl.constexpr):
    """Round float32 values to TF32 (W_ROUND=1) or bfloat16 (2) precision, kept as float32."""
    if W_ROUND == 1:
        b_bits = b_w.to(tl.int32, bitcast=True)
        b_w = ((b_bits + 4096) & -8192).to(tl.float32, bitcast=True)
    if W_ROUND == 2:
        b_bits = b_w.to(tl.int32, bitcast=True)
        b_w = ((b_bits + 32768) & -65536).to(tl.float32, bitcast=True)
    return b_w


@triton.jit
def _accumulate_g(
    G,
    X,
    stride_g,
    stride_x,
    d,
    b_w,
    o_i,
    m_i,
    o_j,
    m_j,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ACC: tl.constexpr,
    W_ROUND: tl.constexpr,
    BF16_STORE: tl.constexpr,
):
    """G[i, :] += W @ X[j, :] chunk by chunk (float32 tile product, float64 accumulator)."""
    b_w = _round_mantissa(b_w, W_ROUND)
    if BF16_STORE:
        b_w = b_w.to(tl.bfloat16)
    o_d = tl.arange(0, BLOCK_D)
    p_x = X + o_j.to(tl.int64)[:, None] * stride_x + o_d[None, :]
    p_g = G + o_i.to(tl.int64)[:, None] * stride_g + o_d[None, :]
    for d0 in range(0, d, BLOCK_D):
        m_d = (d0 + o_d) < d
        b_x = tl.load(p_x + d0, mask=m_j[:, None] & m_d[None, :], other=0.0)
        b_c = tl.dot(b_w, b_x, input_precision=DOT_PREC, out_dtype=ACC)
        m_g = m_i[:, None] & m_d[None, :]
        b_g = tl.load(p_g + d0, mask=m_g, other=0.0)
        tl.store(p_g + d0, b_g + b_c.to(tl.float64), mask=m_g)


@triton.jit
def _zero_rows(G, stride_g, d, o_i, m_i, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    p_g = G + o_i.to(tl.int64)[:, None] * stride_g + o_d[None, :]
    for d0 in range(0, d, BLOCK_D):
        m_g = m_i[:, None] & ((d0 + o_d) < d)[None, :]
        tl.store(p_g + d0, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64), mask=m_g)


@triton.jit
def _epilogue(
    OUT, G, X, b_r, stride_o, stride_g, stride_x, d, o_i, m_i, SCALE, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """OUT[i, :] = (G[i, :] - r_i X[i, :]) * SCALE[0] * SCALE[1] * SCALE[2] in float64 (one
    factor at a time: a zero row stays 0), stored in OUT's dtype."""
    o_d = tl.arange(0, BLOCK_D)
    o_i64 = o_i.to(tl.int64)[:, None]
    for d0 in range(0, d, BLOCK_D):
        m_g = m_i[:, None] & ((d0 + o_d) < d)[None, :]
        b_g = tl.load(G + o_i64 * stride_g + d0 + o_d[None, :], mask=m_g, other=0.0)
        b_x = tl.load(X + o_i64 * stride_x + d0 + o_d[None, :], mask=m_g, other=0.0)
        b_o = b_g - b_r[:, None] * b_x.to(tl.float64)
        b_o = b_o * tl.load(SCALE) * tl.load(SCALE + 1) * tl.load(SCALE + 2)
        tl.store(
            OUT + o_i64 * stride_o + d0 + o_d[None, :],
            b_o.to(OUT.dtype.element_ty),
            mask=m_g,
        )


@triton.jit(do_not_specialize=("n",))
def _bwd_kernel(
    X,
    T,
    NX,
    NT,
    C,
    CT,
    COEF,
    OSCALE,
    GX,
    GT,
    OUTX,
    OUTT,
    n,
    d,
    m,
    stride_x,
    stride_t,
    stride_gx,
    stride_gt,
    stride_ox,
    stride_ot,
    K: tl.constexpr,
    HAS_T: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_T: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ACC: tl.constexpr,
    W_ROUND: tl.constexpr,
    BF16_STORE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # COEF rows (each of length K): 4 c_k g_x[k], 4 c_k g_xt[k], 4 c_t g_xt[k], then 4 c_t g_t
    i_m = tl.program_id(0)
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < n
    b_rx = tl.zeros([BLOCK_M], dtype=tl.float64)
    b_rt = tl.zeros([BLOCK_M], dtype=tl.float64)
    if NEED_X:
        _zero_rows(GX, stride_gx, d, o_i, m_i, BLOCK_M, BLOCK_D)
    if NEED_T:
        _zero_rows(GT, stride_gt, m, o_i, m_i, BLOCK_M, BLOCK_D)
    for j0 in range(0, n, BLOCK_N):
        o_j = j0 + tl.arange(0, BLOCK_N)
        m_j = o_j < n
        b_diag = o_i[:, None] == o_j[None, :]  # W_ii = 0: D_ii = inf
        b_dx = _sqdist_tile(
            X, NX, stride_x, d, o_i, m_i, o_j, m_j, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, ACC
        )
        b_dx = tl.where(b_diag, _INF, b_dx)
        b_wx = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        b_wt = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if HAS_T:
            b_dt = _sqdist_tile(
                T, NT, stride_t, m, o_i, m_i, o_j, m_j, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, ACC
            )
            b_dt = tl.where(b_diag, _INF, b_dt)
            b_et = tl.exp2(b_dt * (-tl.load(CT)))
            if NEED_T:
                b_wt = b_et * tl.load(COEF + 3 * K)
        for k in tl.static_range(K):
            b_e = tl.exp2(b_dx * (-tl.load(C + k)))
            if NEED_X:
                if HAS_T:
                    b_wx += b_e * (tl.load(COEF + k) + tl.load(COEF + K + k) * b_et)
                else:
                    b_wx += b_e * tl.load(COEF + k)
            if NEED_T:
                b_wt += b_e * b_et * tl.load(COEF + 2 * K + k)
        if NEED_X:
            b_rx += tl.sum(b_wx, 1).to(tl.float64)
            _accumulate_g(
                GX, X, stride_gx, stride_x, d, b_wx, o_i, m_i, o_j, m_j,
                BLOCK_M, BLOCK_D, DOT_PREC, ACC, W_ROUND, BF16_STORE,
            )  # fmt: skip
        if NEED_T:
            b_rt += tl.sum(b_wt, 1).to(tl.float64)
            _accumulate_g(
                GT, T, stride_gt, stride_t, m, b_wt, o_i, m_i, o_j, m_j,
                BLOCK_M, BLOCK_D, DOT_PREC, ACC, W_ROUND, BF16_STORE,
            )  # fmt: skip
    if NEED_X:
        _epilogue(
            OUTX, GX, X, b_rx, stride_ox, stride_gx, stride_x, d, o_i, m_i, OSCALE,
            BLOCK_M, BLOCK_D,
        )  # fmt: skip
    if NEED_T:
        _epilogue(
            OUTT, GT, T, b_rt, stride_ot, stride_gt, stride_t, m, o_i, m_i, OSCALE + 3,
            BLOCK_M, BLOCK_D,
        )  # fmt: skip


def _top(v: torch.Tensor) -> torch.Tensor:
    """max |v| as a float64 0-dim tensor, 1 where v is all zeros (no host sync)."""
    top = v.abs().max()
    return torch.where(top > 0, top, torch.ones_like(top))


def _scales(inv_s2: Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor([c * _LOG2E for c in inv_s2], dtype=dtype, device=device)


@launches_on_input
def forward_sums(
    xc: torch.Tensor,
    tc: torch.Tensor | None,
    inv_sx2: Sequence[float],
    inv_st2: float | None,
    want_fx: bool = True,
    *,
    precision: str | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(F_x (K,), F_t (), F_xt (K,)) in float64 for centred ``xc`` (n, d) and ``tc`` (n, m).

    Same contract as ``ops.scores_torch.forward_sums``: ``inv_sx2`` holds c_k = 1/sigma_k^2
    (K >= 1 bandwidths sharing one distance tile); F_t and F_xt are None without ``tc``; F_x is
    None when ``want_fx`` is False. ``precision`` overrides the module setting (`get_precision`).
    ``shard=(rank, world)`` sums only the tiles of every world-th program starting at rank (the
    shards partition the tiles: their sums add up to the whole; `rkekernels.distributed`).

    Example (CPU tensors need ``TRITON_INTERPRET=1`` set before the import, as the tests do):
        >>> import torch
        >>> from rkekernels.ops import scores_triton
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 100.0], [100.0, 0.0]], device=dev)
        >>> fx, ft, fxt = scores_triton.forward_sums(x - x.mean(0), None, (1.0,), None)
        >>> fx.tolist(), ft, fxt
        ([3.0], None, None)
    """
    plan = Plan(check_precision(precision or get_precision()), xc.dtype)
    check_device(xc)
    xs = plan.operand(xc)
    ts = plan.operand(tc)
    nx, nt = plan.norms(xs), plan.norms(ts)
    has_t = ts is not None
    n, d = xs.shape
    m = ts.shape[1] if has_t else 1
    K = len(inv_sx2)
    nsp = next_pow2(2 * K + 1)
    dev = xs.device
    cl = _scales(inv_sx2, plan.work, dev)
    clt = _scales([inv_st2 if has_t else 1.0], plan.work, dev)
    t_arg, nt_arg = (ts, nt) if has_t else (xs, nx)

    rank, world = shard if shard is not None else (0, 1)

    def run(cfg: dict, rows: int) -> torch.Tensor:
        block, group = cfg["BLOCK"], cfg["GROUP"]
        nb = triton.cdiv(rows, block)
        bands = triton.cdiv(nb, group)
        programs = group * bands * (bands + 1) // 2
        mine = max(0, triton.cdiv(programs - rank, world))  # programs rank, rank + world, ...
        part = torch.zeros((max(mine, 1), nsp), dtype=torch.float64, device=dev)
        if mine == 0:
            return part
        _fwd_kernel[(mine,)](
            xs, t_arg, nx, nt_arg, cl, clt, part, rows, d, m, xs.stride(0), t_arg.stride(0),
            rank, world,
            K=K, NSP=nsp, HAS_T=has_t, WANT_FX=want_fx or not has_t, DOT_PREC=plan.dot_prec,
            ACC=plan.acc, BLOCK=block, BLOCK_D=cfg["BLOCK_D"], GROUP=group,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        return part

    key = (*plan.key(), d, m, K, has_t, want_fx)
    cfg = config("fwd", key, plan.acc == tl.float64, n, run)
    sums = run(cfg, n).sum(0)
    fx = sums[:K] if (want_fx or not has_t) else None
    ft = sums[K] if has_t else None
    fxt = sums[K + 1 : 2 * K + 1] if has_t else None
    return fx, ft, fxt


@launches_on_input
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
    precision: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Vector-Jacobian products of `forward_sums`: (dL/dx (n, d), dL/dt (n, m) or None).

    ``g_fx`` (K,), ``g_ft`` (), ``g_fxt`` (K,) are the float64 cotangents (None means zero).
    The gradients come back in the input dtype (float64 scratch accumulation across tiles),
    multiplied by ``scale_x`` / ``scale_t`` in float64 first. As in the torch path, the weight
    coefficients are divided by their largest magnitude (for x and for t apart) before the
    kernel, and that factor is part of the final float64 scale: no overflow of 4 c g.

    Example (CPU tensors need ``TRITON_INTERPRET=1``, see `forward_sums`):
        >>> import torch
        >>> from rkekernels.ops import scores_triton
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> x = torch.tensor([[0.0], [1.0]], device=dev)
        >>> g = torch.ones(1, dtype=torch.float64, device=dev)
        >>> gx, gt = scores_triton.backward_grads(x - x.mean(0), None, (1.0,), None, g, None, None)
        >>> [round(v, 4) for v in gx.flatten().tolist()]  # dF/dx_0 = -4 (x_0 - x_1) exp(-1)
        [1.4715, -1.4715]
    """
    plan = Plan(check_precision(precision or get_precision()), xc.dtype)
    check_device(xc)
    has_t = tc is not None
    need_t = need_t and has_t
    if not (need_x or need_t):
        return None, None
    xs = plan.operand(xc)
    ts = plan.operand(tc)
    nx, nt = plan.norms(xs), plan.norms(ts)
    n, d = xs.shape
    m = ts.shape[1] if has_t else 1
    K = len(inv_sx2)
    dev = xs.device
    c_max = max(inv_sx2)
    c = torch.tensor([v / c_max for v in inv_sx2], dtype=torch.float64, device=dev)
    zero_k = torch.zeros(K, dtype=torch.float64, device=dev)
    ct = float(inv_st2) if has_t else 1.0
    g_x = g_fx.reshape(K).double() if g_fx is not None else zero_k
    g_xt = g_fxt.reshape(K).double() if (g_fxt is not None and has_t) else zero_k
    g_t = g_ft.reshape(1).double() if (g_ft is not None and has_t) else zero_k[:1]
    # 4 c g as (c / c_max)(g / g_max) 4 (at most 4: no overflow in the kernel); the epilogue
    # multiplies by c_max, g_max and the caller's scale one at a time, in float64
    gx_max, gt_max = _top(torch.cat([g_x, g_xt])), _top(torch.cat([g_xt, g_t]))
    coef_x = torch.cat([4.0 * c * g_x, 4.0 * c * g_xt]) / gx_max
    coef_t = torch.cat([4.0 * g_xt, 4.0 * g_t]) / gt_max
    coef = torch.cat([coef_x, coef_t]).to(plan.work).contiguous()
    one = torch.ones((), dtype=torch.float64, device=dev)
    oscale = torch.stack(
        [one * c_max, gx_max, one * scale_x, one * ct, gt_max, one * scale_t]
    ).contiguous()
    cl = _scales(inv_sx2, plan.work, dev)
    clt = _scales([inv_st2 if has_t else 1.0], plan.work, dev)
    t_arg, nt_arg = (ts, nt) if has_t else (xs, nx)

    def run(cfg: dict, rows: int):
        gx = torch.empty((rows, d), dtype=torch.float64, device=dev) if need_x else None
        gt = torch.empty((rows, m), dtype=torch.float64, device=dev) if need_t else None
        ox = torch.empty((rows, d), dtype=plan.out_dtype, device=dev) if need_x else None
        ot = torch.empty((rows, m), dtype=plan.out_dtype, device=dev) if need_t else None
        gx_a, ox_a = (gx, ox) if need_x else (coef, coef)
        gt_a, ot_a = (gt, ot) if need_t else (coef, coef)
        _bwd_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
            xs, t_arg, nx, nt_arg, cl, clt, coef, oscale, gx_a, gt_a, ox_a, ot_a, rows, d, m,
            xs.stride(0), t_arg.stride(0),
            gx.stride(0) if need_x else 0, gt.stride(0) if need_t else 0,
            ox.stride(0) if need_x else 0, ot.stride(0) if need_t else 0,
            K=K, HAS_T=has_t, NEED_X=need_x, NEED_T=need_t, DOT_PREC=plan.dot_prec,
            ACC=plan.acc, W_ROUND=plan.w_round, BF16_STORE=plan.bf16_store,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        return ox, ot

    key = (*plan.key(), d, m, K, has_t, need_x, need_t)
    cfg = config("bwd", key, plan.acc == tl.float64, n, run)
    return run(cfg, n)
