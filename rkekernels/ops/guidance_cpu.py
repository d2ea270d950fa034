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
(4 samples per pass over a row; 1 row per pass for the logits, or 2 from `PAIR_MIN_DIM` on; 4 rows
per pass for the values), run at 65-90 GFLOP/s from cache, and mostly hide behind the memory
stream of the bank: the whole pass costs 1.3-1.4x one GEMM over the bank at D = 768 and 0.8x at
D = 16,384 (benchmarks/bench_guidance.py). Contiguous bfloat16 banks are decoded in the kernel
(a shift of the 16 bits), a block of rows at a time.

Numerics: float32 (or float64) arithmetic like the GEMM path, with reassociation and FMA
contraction allowed but *not* numba's full fastmath: NaN and Inf propagate as in IEEE arithmetic,
so a non-finite input still reaches the caller's check. The shift modes are those of the torch
path: a fixed upper bound of every logit (``shift``), or a running max updated once per block of
rows (one rescale of the b x D accumulator per block where the max grew).

Threads: the kernel releases the GIL; with ``torch.get_num_threads() > 1`` and a bank of at least
`MIN_ROWS_PER_THREAD_BYTES` per thread, the bank is cut into contiguous chunks (about
`CHUNKS_PER_THREAD` per thread) that the calling thread and pool threads take in turn, each chunk
into a state of its own; the states are merged in chunk order (as the Triton path merges its
splits, with `rkekernels.ops.guidance_common.merge_states`), so the result does not depend on which
thread took which chunk. Taking chunks in turn rather than one equal part per thread matters
right after a multi-threaded torch op: its OpenMP workers keep spinning on the other cores for
milliseconds (libgomp's default wait policy), and a thread sharing a core with one of them runs at
half speed; with equal parts the call would wait for that thread. The dispatch
(`rkekernels.ops.guidance.guide`, through its `fast_guide`: backend "torch" or "auto", CPU
tensors) runs `guide` when numba loads (a dependency: see `available`) and `ENABLED` is true;
otherwise the chunked-GEMM path of `guidance_torch` runs. `softmax_state` exposes the kernel's
bank pass alone, with the contract of the GEMM path's but no initial state (the tests compare
the two). The numba kernels themselves are in `rkekernels.ops.guidance_numba`, imported at the
first call.
"""

from __future__ import annotations

import itertools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .guidance_common import BankSide, Problem, State, merge_states

__all__ = [
    "BLOCK_BYTES",
    "BLOCK_ROWS",
    "CHUNKS_PER_THREAD",
    "CHUNK_BYTES",
    "CONVERT_ELEMENTS",
    "ENABLED",
    "MAX_BLOCK_ROWS",
    "MIN_ROWS_PER_THREAD_BYTES",
    "PAIR_MIN_DIM",
    "available",
    "block_rows",
    "enabled",
    "guide",
    "softmax_state",
]

#: Use the fused kernel for CPU tensors when numba is importable. Set False (or the environment
#: variable RKEKERNELS_FUSED_CPU=0) to run the chunked-GEMM torch path instead.
ENABLED = os.environ.get("RKEKERNELS_FUSED_CPU", "1") != "0"

#: Bank bytes per block of rows (the rows whose logits are taken before their values): the block
#: stays in L2 between the two products, and the running max is updated once per block.
BLOCK_BYTES = 128 * 1024

#: At most this many rows per block, and per partial sum of the values: those are summed in the
#: compute dtype over at most this many rows (for wide rows, over several blocks), then added
#: into the float64 accumulator. A float32 sum's error grows with its number of terms (~rows eps
#: when the weights are all alike, as for a bank of near-duplicates).
MAX_BLOCK_ROWS = 64

#: Split the bank over threads only when each thread gets at least this many bytes of it. Below,
#: the split costs more than it saves: right after a multi-threaded torch op, OpenMP's workers
#: spin on the other cores for milliseconds (libgomp's default wait policy), and at n = 10,000,
#: D = 768 (29 MiB) a split measured 2.45x of a 2-thread GEMM against 1.91x whole.
MIN_ROWS_PER_THREAD_BYTES = 16 * 2**20

#: A split bank is cut into chunks of at least this many bytes (a call into the kernel costs
#: ~10 us, a chunk of 2 MiB ~0.2 ms).
CHUNK_BYTES = 2 * 2**20

#: At most this many chunks per thread: enough for the threads to even out (one that shares its
#: core takes fewer), few enough that the per-chunk costs stay small.
CHUNKS_PER_THREAD = 8

#: From this row width on, the logits take 2 bank rows per pass (measured: 0.82x against 0.99x
#: of one GEMM at D = 16,384; at D = 768 one row per pass, 1.08x against 1.58x).
PAIR_MIN_DIM = 4096

#: Elements of bank (and prompt) rows converted to the compute dtype at a time for the banks the
#: kernel cannot read in place: float16 (numba has no float16), non-contiguous rows, float32 rows
#: for float64 math, bfloat16 for float64 math. 2**18 elements: 1 MiB of float32.
CONVERT_ELEMENTS = 1 << 18

#: Fixed number of bank rows per block; overrides BLOCK_BYTES when set (tests use it to place
#: bank sizes around block boundaries).
BLOCK_ROWS: int | None = None

_pool: ThreadPoolExecutor | None = None
_available: bool | None = None  # the import of numba tried once


def available() -> bool:
    """True when numba can be imported (the fused CPU kernel can run).

    numba is a dependency of rkekernels; where it cannot load (not installed, or built for
    another numpy), one `RuntimeWarning` per process says so and the chunked-GEMM torch path
    runs instead (the same results, about twice the time at D = 768).
    """
    global _available
    if _available is None:
        try:
            import numba  # noqa: F401
        except Exception as exc:  # not installed, or broken (a numpy it was not built for)
            _available = False
            warnings.warn(
                f"rkekernels: numba could not be imported ({type(exc).__name__}: {exc}); "
                "guidance_grad on CPU uses the chunked-GEMM torch path (the same results, "
                "about 2x slower). `pip install numba` restores the fused CPU kernel.",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _available = True
    return _available


def enabled() -> bool:
    """Whether `guidance_grad` runs CPU tensors here: numba importable and `ENABLED` true."""
    return ENABLED and available()


def _kernels():
    """The numba kernels (`rkekernels.ops.guidance_numba`), imported at the first call."""
    from . import guidance_numba

    return guidance_numba


def block_rows(dim: int, itemsize: int) -> int:
    """Bank rows per block for rows of ``dim`` elements (`BLOCK_ROWS` wins when set)."""
    if BLOCK_ROWS is not None:
        return max(1, int(BLOCK_ROWS))
    return min(MAX_BLOCK_ROWS, max(8, BLOCK_BYTES // max(1, dim * itemsize)))


def softmax_state(
    phi: torch.Tensor, y: torch.Tensor | None, side: BankSide, shift: torch.Tensor | None = None
) -> State:
    """Softmax state (m (b,), l (b,), acc (b, D)) of the guidance logits over the bank.

    Same arguments (but no initial state: `guide` folds the batch's own state in compiled code),
    result and shift modes as `rkekernels.ops.guidance_torch.softmax_state`, for CPU tensors:
    phi float32 or float64 (the compute dtype); bank and prompt rows in any floating dtype and
    layout (rows that are not C-contiguous in the compute dtype are converted a chunk at a time).

    Example (two bank rows, logits 2 * 0.6 - 1 and 2 * 0.8 - 1; the GEMM path agrees):
        >>> from rkekernels.ops import guidance_torch
        >>> phi = torch.tensor([[0.6, 0.8]])
        >>> side = BankSide(torch.eye(2), None, None, None, 1.0, 0.0)
        >>> m, l, acc = softmax_state(phi, None, side)
        >>> m, l  # running max 0.6; l = exp(0.2 - 0.6) + 1
        (tensor([0.6000]), tensor([1.6703], dtype=torch.float64))
        >>> want = guidance_torch.softmax_state(phi, None, side)
        >>> all(torch.allclose(a, w) for a, w in zip((m, l, acc), want))
        True
    """
    b, dim = phi.shape
    running = shift is None
    m = shift.clone() if shift is not None else phi.new_full((b,), float("-inf"))
    l = phi.new_zeros((b,))
    acc = phi.new_zeros((b, dim))
    if side.bank.shape[0] == 0:
        return m, l, acc
    phi2 = _padded(_arr(phi * (2.0 * side.inv_s2)))
    y2 = _padded(_arr(y * (2.0 * side.inv_c2))) if y is not None else None
    m, l, acc = _fold(phi2, y2, side, (_arr(m), _arr(l.double()), _arr(acc.double())), running)
    return torch.from_numpy(m), torch.from_numpy(l), torch.from_numpy(acc)


def guide(
    p: Problem, z: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`guidance_grad`'s whole computation for CPU tensors, after its input checks.

    Args:
        p: the validated call (`rkekernels.ops.guidance_common.Problem`): the bank, its prompt
            embeddings and cached norms (as `softmax_state`), the bandwidths and the flags.
        z: (b, D) ``p.z`` in the compute dtype (float32 or float64), CPU.
        y: (b, m) ``p.y`` in the compute dtype, or None.

    Returns:
        (grad (b, D), log S (b,), ok): ok is False when an input or result is not finite (the
        caller names the input). Every step runs in compiled code: the per-sample preparation,
        the batch pass, the bank pass (running max: exact and finite for any bandwidth, no
        second pass) and the gradient; a torch op costs ~40 us with cold caches, a kernel ~20.
    """
    inv_s2, inv_c2 = p.inv_s2, p.inv_c2
    k = _kernels()
    b, dim = z.shape
    normalize = bool(p.normalize)  # one compiled kernel whatever type the flag came in
    zn = _arr(z.contiguous())
    dt = zn.dtype
    yn = _arr(y.contiguous()) if y is not None else np.zeros((b, 0), dt)
    phi, phi2, y2 = np.empty_like(zn), _padded(zn), _padded(yn)  # prep fills phi2, y2
    row_const = np.empty(b, dt)
    # ||z|| by torch, as `features` computes it: a sample committed to the bank and the same
    # sample in z then get bitwise the same feature (a gradient of exactly 0, not rounding)
    znorm = _arr(z.norm(dim=1)) if normalize else np.ones(b, dt)
    k.prep(zn, normalize, yn, inv_s2, inv_c2, phi, znorm, phi2, y2, row_const)
    # l and acc in float64: they sum over the whole bank (in float32 they would drift by about
    # (n / block) eps; SPEC: float32 results within 1e-5 up to n = 20,000)
    state = (np.full(b, -np.inf, dt), np.zeros(b, np.float64), np.zeros((b, dim), np.float64))
    has_cond = y is not None
    if p.batch:  # the current samples as entries, self excluded
        k.stream(
            b, phi2, phi, _NO16, _NO_NORMS, y2, yn, _NO16, _NO_NORMS, inv_s2,
            inv_c2, False, has_cond, False, *state, b, True, dim >= PAIR_MIN_DIM,
            yn.shape[1] >= PAIR_MIN_DIM, 0, MAX_BLOCK_ROWS, _PAD,
        )  # fmt: skip
    if p.bank.shape[0] > 0:
        state = _fold(phi2, y2 if has_cond else None, p.bank_side, state, True)
    g, log_s = np.empty_like(zn), np.empty(b, dt)
    ok = k.finish(phi, znorm, normalize, *state, row_const, inv_s2, yn, g, log_s)
    return torch.from_numpy(g), torch.from_numpy(log_s), bool(ok)


_NO16 = np.zeros((0, 0), dtype=np.int16)

#: Elements added to each row of the small (b, D) arrays the kernels stream next to the bank
#: rows. With D a multiple of 1,024 (a 4x64x64 latent: D = 16,384), unpadded rows sit a multiple
#: of 4 KiB apart, like the bank rows, and all map to the same L1 cache sets: how badly depended
#: on where the allocator put them, and a call took 0.8x or 1.5x of one GEMM from run to run.
_PAD = 16


def _padded(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of the (b, w) array ``a`` with rows of w + _PAD elements (zeros past
    w); the kernels read only the first w."""
    out = np.zeros((a.shape[0], a.shape[1] + _PAD), dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


_NO_NORMS = np.zeros(0, dtype=np.float64)


def _norms(sq: torch.Tensor | None) -> np.ndarray:
    """Cached squared norms as float64 numpy (or the empty placeholder)."""
    if sq is None:
        return _NO_NORMS
    return _arr(sq if sq.dtype == torch.float64 else sq.double())


def _arr(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a tensor with the lazy negation bit is materialised)."""
    return t.resolve_neg().numpy()


def _fold(
    phi2: np.ndarray,
    y2: np.ndarray | None,
    side: BankSide,
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    running: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold the bank's rows into ``state`` (updated in place, or merged from thread parts);
    without ``y2`` the bank's prompt embeddings and their norms are not read."""
    bank, bank_sq, bank_cond, bank_cond_sq, inv_s2, inv_c2 = side
    stream = _kernels().stream
    b = phi2.shape[0]
    n, dim = bank.shape  # phi2's rows are padded (see _padded)
    dt = phi2.dtype
    cdt = torch.float64 if dt == np.float64 else torch.float32
    has_cond = y2 is not None
    if not has_cond:
        bank_cond = None
    empty2 = np.zeros((0, 0), dt)
    if y2 is None:
        y2 = np.zeros((b, 0), dt)
    # cached norms: float64 from a FeatureBank (the placeholder has that dtype too, so banks
    # with and without cached norms share one compiled kernel)
    qb = _norms(bank_sq)
    rc = _norms(bank_cond_sq if has_cond else None)
    itemsize = dt.itemsize
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

    kinds = (how(bank), how(bank_cond))
    step_conv = max(1, CONVERT_ELEMENTS // max(1, dim + m_dim))

    def arrays(t: torch.Tensor, kind: str, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows s:e as (float array, int16 bfloat16 bits): one of them is a placeholder."""
        if s > 0 or e < t.shape[0]:
            t = t[s:e]
        if kind == "bf16":
            return empty2, _arr(t.resolve_neg().view(torch.int16))
        if kind == "convert":
            t = t.to(cdt).contiguous()
        return _arr(t), _NO16

    def run(lo: int, hi: int, st: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        step = hi - lo if "convert" not in kinds else step_conv
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            f, f16 = arrays(bank, kinds[0], s, e)
            c, c16 = arrays(bank_cond, kinds[1], s, e) if has_cond else (empty2, _NO16)
            stream(
                e - s, phi2, f, f16, qb[s:e], y2, c, c16, rc[s:e], inv_s2, inv_c2,
                qb.shape[0] > 0, has_cond, rc.shape[0] > 0, *st, block, running,
                dim >= PAIR_MIN_DIM, m_dim >= PAIR_MIN_DIM, -1, MAX_BLOCK_ROWS, _PAD,
            )  # fmt: skip

    row_bytes = dim * bank.element_size() + (m_dim * bank_cond.element_size() if has_cond else 0)
    chunks = _chunks(n, n * row_bytes)
    if chunks == 1:
        run(0, n, state)
        return state
    bounds = [n * k // chunks for k in range(chunks + 1)]
    m0 = state[0] if not running else np.full(b, -np.inf, dt)
    states = [state] + [
        (m0.copy(), np.zeros(b, np.float64), np.zeros((b, dim), np.float64))
        for _ in range(chunks - 1)
    ]
    taken = itertools.count()  # next() is atomic under the GIL: each chunk is taken once

    def work() -> None:
        while (k := next(taken)) < chunks:
            run(bounds[k], bounds[k + 1], states[k])

    # pool threads and this one (no idle waiter) take chunks until none is left
    futures = [_executor().submit(work) for _ in range(min(torch.get_num_threads(), chunks) - 1)]
    work()
    for fut in futures:
        fut.result()
    m, l, acc = merge_states(*(torch.from_numpy(np.stack(v)) for v in zip(*states)), running)
    return m.numpy(), l.numpy(), acc.numpy()


def _chunks(n: int, nbytes: int) -> int:
    """How many chunks a bank of ``n`` rows and ``nbytes`` bytes is cut into (1: not cut)."""
    threads = torch.get_num_threads()
    if threads <= 1 or min(threads, n // 8, nbytes // MIN_ROWS_PER_THREAD_BYTES) <= 1:
        return 1
    return max(2, min(threads * CHUNKS_PER_THREAD, n // 8, nbytes // max(1, CHUNK_BYTES)))


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when needed."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="rkek")
    return _pool
