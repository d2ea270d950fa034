"""The numba kernels of the fused CPU guidance path (imported lazily: by `guidance_cpu` at its
first call, so that importing rkekernels never imports numba).

Math only; the host side (blocks, thread split, dtype conversion, the merge of the thread parts)
is in `rkekernels.ops.guidance_cpu`, the shift / running-max choice and the finish of the other
backends in `rkekernels.ops.guidance`. The state folded here is that of
`rkekernels.ops.guidance_torch.softmax_state`::

    l_aj   = (2 phi_a . f_j - q_j) inv_s2 + (2 y_a . c_j - r_j) inv_c2
    p_aj   = exp(l_aj - m_a)
    l_a   += p_aj
    acc_a += p_aj f_j

Compiled with reassociation and FMA contraction but *not* numba's full fastmath: NaN and Inf
propagate as in IEEE arithmetic, so a non-finite input still reaches the caller's check.
``error_model="numpy"``: IEEE division (x / 0 = inf or NaN), not Python's ZeroDivisionError.
Each kernel is compiled on its first call for the argument types it gets, with an on-disk cache
(next to this file, else numba's per-user cache folder: the first call in a fresh environment
compiles for a few seconds, later processes load the machine code); without a writable cache
location numba raises at decoration, and the kernels are compiled in each process instead.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["decode_bf16", "dots", "finish", "prep", "sq_norm", "stream", "values"]

_FASTMATH = {"reassoc", "contract", "nsz"}  # no "nnan"/"ninf": NaN/Inf propagate; no "arcp":
# x / y stays a correctly rounded division (a sample on a bank entry gets a gradient of exactly 0)
_OPTS = {"fastmath": _FASTMATH, "nogil": True, "error_model": "numpy"}


def _jit(fn):
    """numba.njit with the on-disk cache where numba finds a place for it, else without."""
    try:
        return numba.njit(cache=True, **_OPTS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, **_OPTS)(fn)


@_jit
def dots(w, x, start, rows, out, add, pair):
    """out[r, a] (+)= w[a] . x[start + r] for r < rows: 4 samples per pass over a row, and
    with ``pair`` 2 rows per pass (faster from cache, slower streaming narrow rows)."""
    b = w.shape[0]
    dim = x.shape[1]  # w's rows may be longer (padded, see _padded)
    zero = np.zeros(1, out.dtype)[0]
    r = 0
    while r < rows:
        if pair and r + 2 <= rows:
            x0 = x[start + r]
            x1 = x[start + r + 1]
            a = 0
            while a < b:
                if a + 4 <= b:
                    w0 = w[a]
                    w1 = w[a + 1]
                    w2 = w[a + 2]
                    w3 = w[a + 3]
                    s00 = s01 = s02 = s03 = zero
                    s10 = s11 = s12 = s13 = zero
                    for d in range(dim):
                        u = x0[d]
                        v = x1[d]
                        s00 += w0[d] * u
                        s01 += w1[d] * u
                        s02 += w2[d] * u
                        s03 += w3[d] * u
                        s10 += w0[d] * v
                        s11 += w1[d] * v
                        s12 += w2[d] * v
                        s13 += w3[d] * v
                    if not add:
                        out[r, a] = out[r, a + 1] = out[r, a + 2] = out[r, a + 3] = zero
                        out[r + 1, a] = out[r + 1, a + 1] = zero
                        out[r + 1, a + 2] = out[r + 1, a + 3] = zero
                    out[r, a] += s00
                    out[r, a + 1] += s01
                    out[r, a + 2] += s02
                    out[r, a + 3] += s03
                    out[r + 1, a] += s10
                    out[r + 1, a + 1] += s11
                    out[r + 1, a + 2] += s12
                    out[r + 1, a + 3] += s13
                    a += 4
                else:
                    wa = w[a]
                    s0 = s1 = zero
                    for d in range(dim):
                        s0 += wa[d] * x0[d]
                        s1 += wa[d] * x1[d]
                    if not add:
                        out[r, a] = out[r + 1, a] = zero
                    out[r, a] += s0
                    out[r + 1, a] += s1
                    a += 1
            r += 2
        else:
            x0 = x[start + r]
            a = 0
            while a < b:
                if a + 4 <= b:
                    w0 = w[a]
                    w1 = w[a + 1]
                    w2 = w[a + 2]
                    w3 = w[a + 3]
                    s00 = s01 = s02 = s03 = zero
                    for d in range(dim):
                        u = x0[d]
                        s00 += w0[d] * u
                        s01 += w1[d] * u
                        s02 += w2[d] * u
                        s03 += w3[d] * u
                    if not add:
                        out[r, a] = out[r, a + 1] = out[r, a + 2] = out[r, a + 3] = zero
                    out[r, a] += s00
                    out[r, a + 1] += s01
                    out[r, a + 2] += s02
                    out[r, a + 3] += s03
                    a += 4
                else:
                    wa = w[a]
                    s0 = zero
                    for d in range(dim):
                        s0 += wa[d] * x0[d]
                    if not add:
                        out[r, a] = zero
                    out[r, a] += s0
                    a += 1
            r += 1


@_jit
def values(x, start, rows, p, acc):
    """acc[a] += sum_r p[r, a] x[start + r], 4 rows x 4 samples per pass."""
    b = acc.shape[0]
    dim = x.shape[1]  # acc's rows may be longer (padded, see _padded)
    r = 0
    while r < rows:
        if r + 4 <= rows:
            x0 = x[start + r]
            x1 = x[start + r + 1]
            x2 = x[start + r + 2]
            x3 = x[start + r + 3]
            p0 = p[r]
            p1 = p[r + 1]
            p2 = p[r + 2]
            p3 = p[r + 3]
            a = 0
            while a < b:
                if a + 4 <= b:
                    o0 = acc[a]
                    o1 = acc[a + 1]
                    o2 = acc[a + 2]
                    o3 = acc[a + 3]
                    p00, p01, p02, p03 = p0[a], p0[a + 1], p0[a + 2], p0[a + 3]
                    p10, p11, p12, p13 = p1[a], p1[a + 1], p1[a + 2], p1[a + 3]
                    p20, p21, p22, p23 = p2[a], p2[a + 1], p2[a + 2], p2[a + 3]
                    p30, p31, p32, p33 = p3[a], p3[a + 1], p3[a + 2], p3[a + 3]
                    for d in range(dim):
                        u0 = x0[d]
                        u1 = x1[d]
                        u2 = x2[d]
                        u3 = x3[d]
                        o0[d] += p00 * u0 + p10 * u1 + p20 * u2 + p30 * u3
                        o1[d] += p01 * u0 + p11 * u1 + p21 * u2 + p31 * u3
                        o2[d] += p02 * u0 + p12 * u1 + p22 * u2 + p32 * u3
                        o3[d] += p03 * u0 + p13 * u1 + p23 * u2 + p33 * u3
                    a += 4
                else:
                    o = acc[a]
                    q0, q1, q2, q3 = p0[a], p1[a], p2[a], p3[a]
                    for d in range(dim):
                        o[d] += q0 * x0[d] + q1 * x1[d] + q2 * x2[d] + q3 * x3[d]
                    a += 1
            r += 4
        else:
            x0 = x[start + r]
            for a in range(b):
                o = acc[a]
                q0 = p[r, a]
                for d in range(dim):
                    o[d] += q0 * x0[d]
            r += 1


@_jit
def sq_norm(x):
    s = np.zeros(1, x.dtype)[0]
    for d in range(x.shape[0]):
        s += x[d] * x[d]
    return s


@_jit
def decode_bf16(src, start, rows, dst):
    """dst[r] = float32(src[start + r]) for bfloat16 rows given as int16 bit patterns (the
    upper half of a float32: a shift, exact, NaN/Inf kept)."""
    bits = dst.view(np.uint32)
    for r in range(rows):
        s = src[start + r]
        o = bits[r]
        for d in range(s.shape[0]):
            o[d] = np.uint32(np.uint16(s[d])) << np.uint32(16)


@_jit
def stream(n, phi2, bank, bank16, qb, y2, cond, cond16, rc, inv_s2, inv_c2, has_q,
           has_cond, has_r, m, l, acc, block, running, pair, pair_cond, self_at,
           part_rows, pad):  # fmt: skip
    """Fold n bank rows into the state (m, l, acc), block by block.

    ``qb``/``rc`` are the rows' squared norms (any float dtype; computed here when has_q /
    has_r is false). ``bank16``/``cond16`` (int16 bits of bfloat16 rows), when not empty,
    replace ``bank``/``cond``: each block is decoded into a float32 scratch block in cache,
    so the bank streams at half the bytes. With self_at >= 0, row j is excluded for sample
    j - self_at (the batch pass: the current samples as entries, each without itself).
    """
    b = phi2.shape[0]
    block = max(1, min(block, n))
    is16 = bank16.shape[0] > 0
    cis16 = cond16.shape[0] > 0
    lg = np.empty((block, b), dtype=phi2.dtype)
    fbuf = np.empty((block if is16 else 0, bank16.shape[1]), dtype=phi2.dtype)
    cbuf = np.empty((block if cis16 else 0, cond16.shape[1]), dtype=phi2.dtype)
    # values are summed in the compute dtype over at most part_rows rows, then added into
    # acc (float64); the partial sum is flushed before any rescale of acc
    part = np.zeros((b, acc.shape[1] + pad), dtype=phi2.dtype)
    in_part = 0
    for start in range(0, n, block):
        rows = min(block, n - start)
        f = bank
        fo = start
        if is16:
            decode_bf16(bank16, start, rows, fbuf)
            f = fbuf
            fo = 0
        dots(phi2, f, fo, rows, lg, False, pair)
        if has_cond:
            c = cond
            co = start
            if cis16:
                decode_bf16(cond16, start, rows, cbuf)
                c = cbuf
                co = 0
            dots(y2, c, co, rows, lg, True, pair_cond)
        for r in range(rows):
            j = start + r
            bias = -inv_s2 * (qb[j] if has_q else sq_norm(f[fo + r]))
            if has_cond:
                rb = -inv_c2 * (rc[j] if has_r else sq_norm(c[co + r]))
                # an infinite prompt embedding: NaN, not a silently dropped -inf logit
                bias += rb if math.isfinite(rb) else math.nan
            for a in range(b):
                lg[r, a] += bias
            if self_at >= 0 and 0 <= j - self_at < b:
                lg[r, j - self_at] = -math.inf
        if running:
            for a in range(b):
                top = lg[0, a]
                for r in range(1, rows):
                    top = max(top, lg[r, a])
                if top > m[a]:  # the max grew: rescale this sample's state once
                    scale = math.exp(m[a] - top)  # m = -inf before the first entry: 0
                    l[a] *= scale
                    for d in range(acc.shape[1]):
                        acc[a, d] = (acc[a, d] + part[a, d]) * scale
                        part[a, d] = 0.0
                    m[a] = top
        for r in range(rows):
            for a in range(b):
                # an entry at -inf weighs 0, also while m is still -inf (exp(NaN) not)
                pr = 0.0 if lg[r, a] == -math.inf else math.exp(lg[r, a] - m[a])
                lg[r, a] = pr
                l[a] += pr
        values(f, fo, rows, lg, part)
        in_part += rows
        if in_part + block > part_rows or start + block >= n:
            for a in range(b):
                for d in range(acc.shape[1]):
                    acc[a, d] += part[a, d]
                    part[a, d] = 0.0
            in_part = 0


@_jit
def prep(z, normalize, y, inv_s2, inv_c2, phi, znorm, phi2, y2, row_const):
    """phi = z / znorm (or z), 2 phi / s^2, 2 y / s_c^2 and the logits' bound
    ||phi||^2 / s^2 + ||y||^2 / s_c^2, per sample (as `rkekernels.ops.guidance.guide`)."""
    b, dim = z.shape
    for a in range(b):
        nrm = znorm[a]
        for d in range(dim):
            v = z[a, d] / nrm if normalize else z[a, d]
            phi[a, d] = v
            phi2[a, d] = v * (2.0 * inv_s2)
        row_const[a] = sq_norm(phi[a]) * inv_s2
        if y.shape[1] > 0:
            for d in range(y.shape[1]):
                y2[a, d] = y[a, d] * (2.0 * inv_c2)
            row_const[a] += sq_norm(y[a]) * inv_c2


@_jit
def finish(phi, znorm, normalize, m, l, acc, row_const, inv_s2, y, g, log_s):
    """The gradient and log S from the softmax state (as `rkekernels.ops.guidance_common.finish`):
    returns whether every input and result is finite (one flag for the caller's error path)."""
    b, dim = phi.shape
    ok = True
    for a in range(b):
        has = l[a] > 0
        ok = ok and math.isfinite(l[a])
        if has:
            log_s[a] = (m[a] - row_const[a]) + math.log(l[a])
            ok = ok and math.isfinite(log_s[a])
        else:
            log_s[a] = -math.inf
        proj = np.zeros(1, g.dtype)[0]
        for d in range(dim):
            gv = (phi[a, d] - acc[a, d] / l[a]) * (2.0 * inv_s2) if has else 0.0
            g[a, d] = gv
            proj += phi[a, d] * gv
            ok = ok and math.isfinite(phi[a, d])
        for d in range(dim):
            if normalize:  # chain rule through phi = z / ||z||: (I - u u^T) g / ||z||
                g[a, d] = (g[a, d] - phi[a, d] * proj) / znorm[a]
            ok = ok and math.isfinite(g[a, d])
        for d in range(y.shape[1]):
            ok = ok and math.isfinite(y[a, d])
    return ok
