"""Streaming torch path for the guidance softmax state over a feature bank (CPU and CUDA).

Math (SPEC section 2, "Guidance objective"). For b current features phi_a (rows of ``phi``),
bank rows f_j with squared norms q_j = ||f_j||^2, optional prompt embeddings y_a / c_j with
squared norms r_j = ||c_j||^2, and inv_s2 = 1/s^2, inv_c2 = 1/s_c^2, the logits *without* the
per-row constants (they cancel in the softmax and are added back by the caller) are::

    l_aj = (2 phi_a . f_j - q_j) inv_s2 + (2 y_a . c_j - r_j) inv_c2

This module returns an un-normalised softmax state over the bank, for some shift m_a::

    l_a   = sum_j exp(l_aj - m_a)
    acc_a = sum_j exp(l_aj - m_a) f_j                      (b, D)

so that log S_a = m_a + log l_a - ||phi_a||^2 inv_s2 - ||y_a||^2 inv_c2 and
sum_j pi_aj f_j = acc_a / l_a. Two ways to pick m_a:

- ``shift=None``: the running max (online softmax). Every exponent is <= 0 and the largest is 0,
  so the state is exact and finite for any bandwidth.
- ``shift=M`` with M_a = ||phi_a||^2 inv_s2 + ||y_a||^2 inv_c2, an upper bound of every logit
  (2 a.b - ||b||^2 <= ||a||^2), so l_aj - M_a = -||phi_a - f_j||^2/s^2 - ||y_a - c_j||^2/s_c^2
  <= 0: no overflow, and no per-chunk max, rescale or extra dispatches. It can underflow when
  every entry is many bandwidths away; the caller checks l_a and falls back to the running max.

For CPU tensors `guidance_grad` runs the fused numba kernel of `rkekernels.ops.guidance_cpu`
when numba is installed (same result to rounding); the code here is the path without it, and
the one for CUDA tensors with backend="torch".

The bank is visited once, in chunks of rows: each chunk is used for the logits (one GEMM for all
b samples, the norms as its bias) and, right after, for the values (a second GEMM with the same
chunk, while it is still in cache). Extra memory: O(b D) for the state, one chunk of logits
(b x rows), an (n,) vector of scaled norms for a FeatureBank, and for a float16/bfloat16 bank
one upcast chunk.
"""

from __future__ import annotations

import torch

from .guidance_common import BankSide, State

__all__ = [
    "CHUNK_ELEMENTS",
    "CHUNK_ROWS",
    "MAX_CHUNK_ROWS",
    "ROWS_FIRST_MAX_DIM",
    "chunk_rows",
    "softmax_state",
]

#: Elements per bank chunk (rows = CHUNK_ELEMENTS // D, at least 16): 2**18 float32 = 1 MiB,
#: sized so a chunk stays in cache (L2) between the logits and the values GEMM.
CHUNK_ELEMENTS = 1 << 18

#: At most this many rows per chunk: the values GEMM sums a chunk's rows in the compute dtype
#: (the chunks are summed in float64), so narrow rows get no longer float32 sums than the
#: score tiles (1,024).
MAX_CHUNK_ROWS = 1024

#: Up to this width the logits GEMM is laid out as (rows, D) @ (D, b) ("bank @ z.T"), above it
#: as (b, D) @ (D, rows): on MKL (single thread, b = 4) the first is faster streaming narrow
#: rows, the second for wide rows (measured at D = 768 and 16,384; benchmarks/bench_guidance.py).
ROWS_FIRST_MAX_DIM = 4096

#: Fixed number of rows per chunk; overrides CHUNK_ELEMENTS when set (tests use it to place bank
#: sizes around chunk boundaries).
CHUNK_ROWS: int | None = None


def chunk_rows(dim: int) -> int:
    """Rows of the bank processed per chunk for features of width ``dim``."""
    if CHUNK_ROWS is not None:
        return max(1, int(CHUNK_ROWS))
    return min(MAX_CHUNK_ROWS, max(16, CHUNK_ELEMENTS // max(1, dim)))


def softmax_state(
    phi: torch.Tensor,
    y: torch.Tensor | None,
    side: BankSide,
    state: State | None = None,
    shift: torch.Tensor | None = None,
) -> State:
    """Softmax state (m (b,), l (b,), acc (b, D)) of the logits above over the bank.

    Args:
        phi: (b, D) current features, float32 or float64 (the compute dtype).
        y: (b, m) prompt embeddings of the current samples, or None (unconditional).
        side: the bank, its prompt embeddings (None iff ``y`` is None), cached squared norms
            (None: computed chunk by chunk) and the bandwidths
            (`rkekernels.ops.guidance_common.BankSide`); a bank in a narrower dtype than phi's
            is upcast chunk by chunk.
        state: an initial state (m, l, acc) over other entries (state in, state out), whose
            acc may be updated in place; with ``shift`` its m must be ``shift``.
        shift: None for the running max, or (b,) fixed shifts m_a >= every logit (see above).

    Returns:
        (m, l, acc): m in phi's dtype, l and acc in float64 (float32 on Apple MPS): they are
        summed across chunks in float64 (SPEC section 5: float32 results within 1e-5 up to
        n = 20,000; a float32 sum over the chunks drifted to 5.5e-5 there). An empty bank (and
        no state) gives l = 0, acc = 0 and m = -inf (or the shift).

    Example:
        >>> phi = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> side = BankSide(phi.clone(), None, None, None, 1.0, 0.0)
        >>> m, l, acc = softmax_state(phi, None, side)  # one entry, logit 2 - 1 = 1
        >>> float(m[0]), float(l[0]), acc.tolist()
        (1.0, 1.0, [[1.0, 0.0]])
    """
    bank, bank_sq, bank_cond, bank_cond_sq, inv_s2, inv_c2 = side
    cdt = phi.dtype
    wide = torch.float32 if phi.device.type == "mps" else torch.float64
    b, dim = phi.shape
    n = bank.shape[0]
    if state is not None:
        m, l, acc = state[0], state[1].to(wide), state[2].to(wide)
    else:
        m = shift if shift is not None else phi.new_full((b,), float("-inf"))
        l = phi.new_zeros((b,), dtype=wide)
        acc = phi.new_zeros((b, dim), dtype=wide)
    if n == 0:
        return m, l, acc
    phi2 = phi * (2.0 * inv_s2)  # logits = phi2 @ f^T - q inv_s2
    y2 = y * (2.0 * inv_c2) if y is not None else None
    rows_first = dim <= ROWS_FIRST_MAX_DIM
    # scaled norms as one bias vector when cached (O(n), D times less than the bank)
    q_all = (bank_sq * -inv_s2).to(cdt) if bank_sq is not None else None
    r_all = None
    if y2 is not None and bank_cond_sq is not None:
        # the check on the cached norms themselves: a huge finite one may round to -inf in
        # float32, a logit of -inf and a weight of 0, which is the right limit
        r_all = (_nan_unless_finite(bank_cond_sq) * -inv_c2).to(cdt)
    neg_shift = -shift.unsqueeze(1) if shift is not None else None
    rows = chunk_rows(dim)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        # logits: one GEMM for all b samples, the scaled squared norms as its bias; `lg` is the
        # (b, rows) view whichever layout the GEMM wrote
        f, q, beta = _chunk(bank, q_all, start, stop, cdt, inv_s2)
        if rows_first:
            lg = torch.addmm(q.unsqueeze(1), f, phi2.T, beta=beta).T
        else:
            lg = torch.addmm(q.unsqueeze(0), phi2, f.T, beta=beta)
        if y2 is not None:
            c, r, alpha_r = _chunk(bank_cond, r_all, start, stop, cdt, inv_c2)
            if r_all is None:
                r = _nan_unless_finite(r)
            if rows_first:
                lg.T.addmm_(c, y2.T).add_(r.unsqueeze(1), alpha=alpha_r)
            else:
                lg.addmm_(y2, c.T).add_(r.unsqueeze(0), alpha=alpha_r)
        if neg_shift is not None:
            p = lg.add_(neg_shift).exp_()  # every exponent <= 0 by the bound
            l = l.add_(p.sum(1))
        else:
            m_new = torch.maximum(m, lg.amax(1))
            alpha = torch.exp(m - m_new)  # m = -inf on the first chunk: alpha = 0
            p = lg.sub_(m_new.unsqueeze(1)).exp_()  # in place: every exponent <= 0
            l = torch.addcmul(p.sum(1), l, alpha)
            acc.mul_(alpha.unsqueeze(1))
            m = m_new
        acc.add_(p @ f)  # values GEMM with the same chunk, still in cache; summed in float64
    return m, l, acc


def _chunk(
    t: torch.Tensor, scaled_sq: torch.Tensor | None, start: int, stop: int, cdt, inv2: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rows start:stop of ``t`` in the compute dtype, their squared norms, and the factor those
    enter the logits with: the cached norms already scaled by -1/s^2 (factor 1), or the norms
    of the chunk computed here (factor -``inv2``)."""
    rows = t[start:stop]
    if rows.dtype != cdt:
        rows = rows.to(cdt)
    if scaled_sq is not None:
        return rows, scaled_sq[start:stop], 1.0
    return rows, _sq_norms(rows), -inv2


def _nan_unless_finite(r: torch.Tensor) -> torch.Tensor:
    """Prompt norms with NaN for a non-finite entry. An infinite prompt embedding c_j would give
    the logit 2 y.c_j - ||c_j||^2 = -inf (the entry silently dropped: c_j, unlike f_j, never
    meets a zero weight in the values), so it is made NaN and reaches the caller's check."""
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))


def _sq_norms(f: torch.Tensor) -> torch.Tensor:
    """Row squared norms of a chunk (for banks given as plain tensors, without cached norms)."""
    return torch.linalg.vector_norm(f, dim=1).square_()
