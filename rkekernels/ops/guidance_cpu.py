"""Fused CPU kernel for the guidance softmax state (numba): one read of each bank row.

The same state as `rkekernels.ops.guidance_torch.softmax_state` (see its docstring for the math),
computed in one pass in which each bank row is read from memory once and used, while it is in the
L1/L2 cache, for both products: its logits against all b samples and its softmax-weighted share
of the values::

    l_aj   = (2 phi_a . f_j - q_j) inv_s2 + (2 y_a . c_j - r_j) inv_c2
    p_aj   = exp(l_aj - m_a)
    l_a   += p_aj
    acc_a += p_aj f_j

Why a kernel of its own: with b = 4 samples, a BLAS GEMM (``bank @ z.T``) runs far below the
CPU's peak (MKL's small-b kernel: about 30 GFLOP/s on one AVX-512 core, measured) and the chunked
torch path runs two such GEMMs, so it costs about two GEMMs. Here the products are register-blocked
(2 bank rows x 4 samples for the logits, 4 rows x 4 samples for the values), run at about 90
GFLOP/s from cache, and hide behind the memory stream of the bank: the whole pass costs about one
read of the bank (benchmarks/bench_guidance.py).

Numerics: float32 (or float64) arithmetic like the GEMM path, with reassociation and FMA
contraction allowed but *not* numba's full fastmath: NaN and Inf propagate as in IEEE arithmetic,
so a non-finite input still reaches the caller's check. The shift modes are those of the torch
path: a fixed upper bound of every logit (``shift``), or a running max updated once per block of
rows (one rescale of the b x D accumulator per block where the max grew).

Threads: the kernel releases the GIL; with ``torch.get_num_threads() > 1`` and a large bank, the
bank is split into contiguous parts, one per thread, and their states merged (as the Triton path
merges its splits). Used by the torch backend for CPU tensors when numba is installed
(``pip install "rkekernels[cpu]"``) and `ENABLED` is true; otherwise the chunked-GEMM path runs.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["BLOCK_BYTES", "ENABLED", "MIN_ROWS_PER_THREAD_BYTES", "available", "softmax_state"]

#: Use the fused kernel for CPU tensors when numba is importable. Set False (or the environment
#: variable RKEKERNELS_FUSED_CPU=0) to run the chunked-GEMM torch path instead.
ENABLED = os.environ.get("RKEKERNELS_FUSED_CPU", "1") != "0"

#: Bank bytes per block of rows (the rows whose logits are taken before their values): the block
#: stays in L2 between the two products, and the running max is updated once per block.
BLOCK_BYTES = 128 * 1024

#: Split the bank over threads only when each thread gets at least this many bytes of it. Below,
#: the hand-off costs more than it saves; and right after a multi-threaded torch op, OpenMP's
#: spinning workers hold the other cores for a while (OMP_WAIT_POLICY=PASSIVE releases them), so
#: a split of a small bank measured no gain on the 2-core benchmark machine.
MIN_ROWS_PER_THREAD_BYTES = 16 * 2**20

#: From this row width on, the logits take 2 bank rows per pass (measured: 0.82x against 0.99x
#: of one GEMM at D = 16,384; at D = 768 one row per pass, 1.08x against 1.58x).
PAIR_MIN_DIM = 4096

#: Bank rows converted to the compute dtype at a time for float16/bfloat16 banks (numba has no
#: bfloat16): 2**18 elements, 1 MiB of float32.
CONVERT_ELEMENTS = 1 << 18

_NATIVE = (torch.float32, torch.float64)
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # no "nnan"/"ninf": NaN/Inf must propagate

_kernel = None
_pool: ThreadPoolExecutor | None = None


def available() -> bool:
    """True when numba can be imported (the fused CPU kernel can run)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _compile():
    """Build the numba kernels once (lazily: importing rkekernels does not import numba)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    from numba import njit

    jit = njit(fastmath=_FASTMATH, nogil=True, cache=_cache_ok())

    @jit
    def dots(w, x, start, rows, out, add, pair):
        """out[r, a] (+)= w[a] . x[start + r] for r < rows: 4 samples per pass over a row, and
        with ``pair`` 2 rows per pass (faster from cache, slower streaming narrow rows)."""
        b, dim = w.shape
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

    @jit
    def values(x, start, rows, p, acc):
        """acc[a] += sum_r p[r, a] x[start + r], 4 rows x 4 samples per pass."""
        b, dim = acc.shape
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

    @jit
    def sq_norm(x):
        s = np.zeros(1, x.dtype)[0]
        for d in range(x.shape[0]):
            s += x[d] * x[d]
        return s

    @jit
    def decode_bf16(src, start, rows, dst):
        """dst[r] = float32(src[start + r]) for bfloat16 rows given as int16 bit patterns (the
        upper half of a float32: a shift, exact, NaN/Inf kept)."""
        bits = dst.view(np.uint32)
        for r in range(rows):
            s = src[start + r]
            o = bits[r]
            for d in range(s.shape[0]):
                o[d] = np.uint32(np.uint16(s[d])) << np.uint32(16)

    @jit
    def stream(n, phi2, bank, bank16, qb, y2, cond, cond16, rc, inv_s2, inv_c2, has_q,
               has_cond, has_r, m, l, acc, block, running, pair, pair_cond):  # fmt: skip
        """Fold n bank rows into the state (m, l, acc), block by block. ``bank16``/``cond16``
        (int16 bits of bfloat16 rows), when not empty, replace ``bank``/``cond``: each block is
        decoded into a float32 scratch block in cache, so the bank streams at half the bytes."""
        b = phi2.shape[0]
        is16 = bank16.shape[0] > 0
        cis16 = cond16.shape[0] > 0
        lg = np.empty((block, b), dtype=acc.dtype)
        fbuf = np.empty((block if is16 else 0, bank16.shape[1]), dtype=acc.dtype)
        cbuf = np.empty((block if cis16 else 0, cond16.shape[1]), dtype=acc.dtype)
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
                bias = qb[j] if has_q else -inv_s2 * sq_norm(f[fo + r])
                if has_cond:
                    rb = rc[j] if has_r else -inv_c2 * sq_norm(c[co + r])
                    # an infinite prompt embedding: NaN, not a silently dropped -inf logit
                    bias += rb if math.isfinite(rb) else math.nan
                for a in range(b):
                    lg[r, a] += bias
            if running:
                for a in range(b):
                    top = lg[0, a]
                    for r in range(1, rows):
                        top = max(top, lg[r, a])
                    if top > m[a]:  # the max grew: rescale this sample's state once
                        scale = math.exp(m[a] - top)  # m = -inf before the first entry: 0
                        l[a] *= scale
                        for d in range(acc.shape[1]):
                            acc[a, d] *= scale
                        m[a] = top
            for r in range(rows):
                for a in range(b):
                    pr = math.exp(lg[r, a] - m[a])
                    lg[r, a] = pr
                    l[a] += pr
            values(f, fo, rows, lg, acc)

    _kernel = stream
    return _kernel


def _cache_ok() -> bool:
    """Cache compiled kernels on disk only where numba can write its cache (else compile per
    process: numba raises at compile time when no cache location is writable)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    if os.access(os.path.dirname(here), os.W_OK) and (
        not os.path.exists(here) or os.access(here, os.W_OK)
    ):
        return True
    return bool(os.environ.get("NUMBA_CACHE_DIR"))


def block_rows(dim: int, itemsize: int) -> int:
    """Bank rows per block for rows of ``dim`` elements (``guidance_torch.CHUNK_ROWS`` wins)."""
    from . import guidance_torch

    if guidance_torch.CHUNK_ROWS is not None:
        return max(1, int(guidance_torch.CHUNK_ROWS))
    return max(8, BLOCK_BYTES // max(1, dim * itemsize))


def softmax_state(
    phi: torch.Tensor,
    bank: torch.Tensor,
    bank_sq: torch.Tensor | None,
    y: torch.Tensor | None,
    bank_cond: torch.Tensor | None,
    bank_cond_sq: torch.Tensor | None,
    inv_s2: float,
    inv_c2: float,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax state (m (b,), l (b,), acc (b, D)) of the guidance logits over ``bank``.

    Same arguments, result and shift modes as `rkekernels.ops.guidance_torch.softmax_state`,
    for CPU tensors: phi float32 or float64 (the compute dtype); bank and prompt rows in any
    floating dtype and layout (rows that are not C-contiguous in the compute dtype are converted
    a chunk at a time).
    """
    cdt = phi.dtype
    b, dim = phi.shape
    n = bank.shape[0]
    running = shift is None
    if state is not None:
        m, l, acc = (t.contiguous() for t in state)
        if running:
            m = m.clone()
    else:
        m = shift.clone() if shift is not None else phi.new_full((b,), float("-inf"))
        l = phi.new_zeros((b,))
        acc = phi.new_zeros((b, dim))
    if n == 0:
        return m, l, acc
    stream = _compile()
    has_cond = y is not None
    phi2 = (phi * (2.0 * inv_s2)).contiguous()
    y2 = (y * (2.0 * inv_c2)).contiguous() if has_cond else phi.new_zeros((b, 0))
    qb = (bank_sq * -inv_s2).to(cdt).contiguous() if bank_sq is not None else None
    rc = None
    if has_cond and bank_cond_sq is not None:
        rc = (bank_cond_sq * -inv_c2).to(cdt).contiguous()
    empty1 = phi.new_zeros((0,)).numpy()
    empty2 = phi.new_zeros((0, 0)).numpy()
    no16 = np.zeros((0, 0), dtype=np.int16)
    itemsize = phi.element_size()
    block = block_rows(dim, itemsize)
    m_dim = bank_cond.shape[1] if has_cond else 0

    def how(t: torch.Tensor | None) -> str:
        """How the kernel reads a (rows, width) input: in place, as bfloat16 bits, or converted
        to the compute dtype a chunk at a time."""
        if t is None or (t.dtype == cdt and t.is_contiguous()):
            return "native"
        if t.dtype == torch.bfloat16 and cdt == torch.float32 and t.is_contiguous():
            return "bf16"
        return "convert"

    kinds = (how(bank), how(bank_cond if has_cond else None))
    step_conv = max(1, CONVERT_ELEMENTS // max(1, dim + m_dim))

    def arrays(t: torch.Tensor, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(float array, int16 bfloat16 bits): one of them is a placeholder."""
        if kind == "bf16":
            return empty2, t.view(torch.int16).numpy()
        return t.to(cdt).contiguous().numpy(), no16  # a view unless kind == "convert"

    def run(lo: int, hi: int, mt: torch.Tensor, lt: torch.Tensor, acct: torch.Tensor) -> None:
        step = hi - lo if "convert" not in kinds else step_conv
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            f, f16 = arrays(bank[s:e], kinds[0])
            c, c16 = arrays(bank_cond[s:e], kinds[1]) if has_cond else (empty2, no16)
            stream(
                e - s, phi2.numpy(), f, f16, qb[s:e].numpy() if qb is not None else empty1,
                y2.numpy(), c, c16, rc[s:e].numpy() if rc is not None else empty1,
                inv_s2, inv_c2, qb is not None, has_cond, rc is not None,
                mt.numpy(), lt.numpy(), acct.numpy(), block, running,
                dim >= PAIR_MIN_DIM, m_dim >= PAIR_MIN_DIM,
            )  # fmt: skip

    parts = _parts(n, n * (dim + m_dim) * itemsize)
    if parts == 1:
        run(0, n, m, l, acc)
        return m, l, acc
    bounds = [n * k // parts for k in range(parts + 1)]
    states = [(m, l, acc)] + [
        (
            shift.clone() if shift is not None else phi.new_full((b,), float("-inf")),
            phi.new_zeros((b,)),
            phi.new_zeros((b, dim)),
        )
        for _ in range(parts - 1)
    ]
    # parts 1.. on the pool, part 0 on this thread (no idle waiter)
    futures = [
        _executor().submit(run, bounds[k], bounds[k + 1], *states[k]) for k in range(1, parts)
    ]
    run(bounds[0], bounds[1], *states[0])
    for fut in futures:
        fut.result()
    return _merge(states, running)


def _parts(n: int, nbytes: int) -> int:
    """How many threads share a bank of ``n`` rows and ``nbytes`` bytes."""
    threads = torch.get_num_threads()
    if threads <= 1:
        return 1
    return max(1, min(threads, n // 8, nbytes // MIN_ROWS_PER_THREAD_BYTES))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="rkek")
    return _pool


def _merge(
    states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], running: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One state from the states of disjoint parts of the bank (all relative to one shift, or
    each to its own running max)."""
    ms = torch.stack([s[0] for s in states])  # (P, b)
    ls = torch.stack([s[1] for s in states])
    accs = torch.stack([s[2] for s in states])  # (P, b, D)
    if not running:
        return states[0][0], ls.sum(0), accs.sum(0)
    top = ms.amax(0)
    # a part that saw nothing (m = -inf) weighs 0; exp(-inf - -inf) would be NaN
    w = torch.where(ms == -math.inf, 0.0, torch.exp(ms - top))
    return top, (w * ls).sum(0), (w.unsqueeze(2) * accs).sum(0)
