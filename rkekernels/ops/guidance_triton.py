"""Triton path for the guidance softmax state: one kernel split over the bank, then a small combine.

Same contract as ``ops.guidance_torch.softmax_state``. For b current features phi_a, bank rows
f_j and optional prompt embeddings y_a / c_j, with inv_s2 = 1/s^2 and inv_c2 = 1/s_c^2::

    l_aj  = (2 phi_a . f_j - ||f_j||^2) inv_s2 + (2 y_a . c_j - ||c_j||^2) inv_c2
    m_a   = max_j l_aj,   l_a = sum_j exp(l_aj - m_a),   acc_a = sum_j exp(l_aj - m_a) f_j

Kernel: program (i_s, i_b) owns the bank rows [i_s R, (i_s + 1) R) and the samples
[i_b BLOCK_B, (i_b + 1) BLOCK_B). For each block of BLOCK_N bank rows it

1. accumulates phi . f and ||f||^2 over the feature dimension in BLOCK_D slices (and y . c,
   ||c||^2 over the prompt dimension: the conditional weights are fused into the logits);
2. updates the running max m, the running sum l and rescales its partial acc (online softmax:
   every exponent is <= 0, so any bandwidth is finite);
3. adds p @ f to acc, re-reading the same bank block (still in L1/L2) slice by slice.

Each program writes its (m, l, acc) to a per-split buffer; the combine (torch, O(splits b D))
rescales the splits to the global max and sums them. Bank rows are loaded in their storage dtype
(float16/bfloat16 halve the traffic) and upcast to float32 in registers (float64 in, float64
math). float32 dot products use ``input_precision="ieee"`` (no TF32): the accuracy is that of
the torch path, relative error <= 1e-5 for the gradient.

Verified where: every variant (float32 / float16 / bfloat16 / float64 bank, with and without
prompts) runs in the interpreter against the float64 reference (tests/test_guidance_triton.py)
and compiles for sm_90 without spills (Triton 3.9, no GPU at hand); nothing here has been timed on
a GPU. Expected cost: one read of the bank from HBM, plus the re-read of each block from L2. For
wide features (D = 16,384: 4 MiB per block of 64 rows, times one block per SM) the blocks exceed
L2 and the re-read goes to HBM too, so expect up to 2x the bytes of one GEMM there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .guidance_common import BankSide, State, merge_states
from .launch import launches_on_input
from .scores_triton import check_device

__all__ = ["MAX_SPLIT_ROWS", "NO_SPECIALIZE", "SPLITS", "plan_splits", "softmax_state"]

#: Number of bank splits (programs along the bank); None chooses from the bank size and the
#: device (about one split per streaming multiprocessor). Tests set it to cover several splits.
SPLITS: int | None = None


@triton.jit
def _dot(a, b, FMA: tl.constexpr):
    # (B, K) @ (K, N): tl.dot in float32 without TF32 (needs B >= 16); a plain FMA reduction in
    # float64 and for sample blocks of fewer than 16 rows (b = 4 is not padded to 16 rows)
    if FMA:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision="ieee")


#: Integer arguments that must not create a compiled variant per value (Triton specialises
#: integers equal to 1 and multiples of 16): counts. Widths and strides keep their
#: specialisation (aligned rows give vector loads).
NO_SPECIALIZE = ("b", "n", "n_blocks")


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _guidance_state_kernel(
    phi_ptr,
    bank_ptr,
    y_ptr,
    cond_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    b,
    n,
    dim,
    cdim,
    n_blocks,
    stride_phi,
    stride_bank,
    stride_y,
    stride_cond,
    scal_ptr,
    HAS_COND: tl.constexpr,
    FP64: tl.constexpr,
    FMA: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_b = tl.program_id(1)
    DT = tl.float64 if FP64 else tl.float32
    # 1/s^2 and 1/s_c^2 come in a tensor of the compute dtype (a Python float would be fp32)
    inv_s2 = tl.load(scal_ptr)
    inv_c2 = tl.load(scal_ptr + 1)
    # every pointer offset in int64 (one expression per pointer): n D elements, or splits b D,
    # exceed 2^31 for large banks (131,072 rows at D = 16,384)
    o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = o_b < b
    o_b64 = o_b.to(tl.int64)
    # split i_s owns the bank blocks [i_s nb / S, (i_s + 1) nb / S): every split 1+ blocks,
    # the counts differ by at most one (S = the number of splits <= nb)
    n_splits = tl.num_programs(0)
    row0 = ((i_s * n_blocks) // n_splits) * BLOCK_N
    row1 = tl.minimum((((i_s + 1) * n_blocks) // n_splits) * BLOCK_N, n)
    b_m = tl.full([BLOCK_B], float("-inf"), DT)
    b_l = tl.zeros([BLOCK_B], DT)
    p_acc0 = acc_ptr + i_s.to(tl.int64) * b * dim  # this split's (b, dim) slab of the partials
    for start in range(row0, row1, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < row1
        o_n64 = o_n.to(tl.int64)
        # -- logits of this block: (2 phi.f - ||f||^2) inv_s2 (+ the prompt term)
        b_s = tl.zeros([BLOCK_B, BLOCK_N], DT)
        b_q = tl.zeros([BLOCK_N], DT)
        for d0 in range(0, dim, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < dim
            b_phi = tl.load(
                phi_ptr + (o_b64[:, None] * stride_phi + o_d[None, :]),
                mask=m_b[:, None] & m_d[None, :],
                other=0.0,
            ).to(DT)
            b_f = tl.load(
                bank_ptr + (o_n64[:, None] * stride_bank + o_d[None, :]),
                mask=m_n[:, None] & m_d[None, :],
                other=0.0,
            ).to(DT)
            b_s += _dot(b_phi, tl.trans(b_f), FMA)
            b_q += tl.sum(b_f * b_f, axis=1)
        b_logit = (2.0 * b_s - b_q[None, :]) * inv_s2
        if HAS_COND:
            b_sc = tl.zeros([BLOCK_B, BLOCK_N], DT)
            b_r = tl.zeros([BLOCK_N], DT)
            for k0 in range(0, cdim, BLOCK_M):
                o_k = k0 + tl.arange(0, BLOCK_M)
                m_k = o_k < cdim
                b_y = tl.load(
                    y_ptr + (o_b64[:, None] * stride_y + o_k[None, :]),
                    mask=m_b[:, None] & m_k[None, :],
                    other=0.0,
                ).to(DT)
                b_c = tl.load(
                    cond_ptr + (o_n64[:, None] * stride_cond + o_k[None, :]),
                    mask=m_n[:, None] & m_k[None, :],
                    other=0.0,
                ).to(DT)
                b_sc += _dot(b_y, tl.trans(b_c), FMA)
                b_r += tl.sum(b_c * b_c, axis=1)
            b_logit += (2.0 * b_sc - b_r[None, :]) * inv_c2
        b_logit = tl.where(m_n[None, :], b_logit, float("-inf"))
        # -- online softmax update (the block holds >= 1 valid row: b_m_new is finite)
        b_m_new = tl.maximum(b_m, tl.max(b_logit, axis=1))
        b_alpha = tl.exp(b_m - b_m_new)
        b_p = tl.exp(b_logit - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        # -- values: acc = alpha acc + p @ f, the same bank block re-read slice by slice
        for d0 in range(0, dim, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < dim
            b_f = tl.load(
                bank_ptr + (o_n64[:, None] * stride_bank + o_d[None, :]),
                mask=m_n[:, None] & m_d[None, :],
                other=0.0,
            ).to(DT)
            p_acc = p_acc0 + (o_b64[:, None] * dim + o_d[None, :])
            m_acc = m_b[:, None] & m_d[None, :]
            b_acc = tl.load(p_acc, mask=m_acc, other=0.0)
            b_acc = b_acc * b_alpha[:, None] + _dot(b_p, b_f, FMA)
            tl.store(p_acc, b_acc, mask=m_acc)
        b_m = b_m_new
    o_state = i_s.to(tl.int64) * b + o_b64
    tl.store(m_ptr + o_state, b_m, mask=m_b)
    tl.store(l_ptr + o_state, b_l, mask=m_b)


def _blocks(b: int, device: torch.device, fp64: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_M, num_warps) for b samples on the device.

    BLOCK_B: the next power of two >= b up to 16 (b = 4 runs 4 rows of FMA work, not 16), 16
    from there (tl.dot). GPU choices come from compiling for sm_90 with Triton 3.9 on a machine
    without a GPU (cuobjdump resource usage): float32 / float16 / bfloat16 banks 190-239
    registers and no spills with 8 warps; float64 166 registers, no spills. Larger feature slices
    (BLOCK_D 32 with 4 warps, or 128) spill, since the exact-float32 ``tl.dot`` is an FMA loop.
    Not timed on a GPU. The interpreter uses small blocks (its cost is per operation) with the
    same BLOCK_B rule, so both dot forms are tested there.
    """
    block_b = min(16, triton.next_power_of_2(max(1, b)))
    if device.type != "cuda":
        return block_b, 16, 32, 16, 1
    if fp64:
        return block_b, 16, 16, 16, 4
    return block_b, 64, 32, 32, 8


#: At most this many bank rows per split: a split sums its rows in the compute dtype, the
#: splits are summed in float64 (as the torch paths' chunks: float32 within 1e-5 to n = 20,000
#: even for a bank of near-duplicates, whose weights are all alike).
MAX_SPLIT_ROWS = 1024


def plan_splits(n: int, block_n: int, programs: int) -> tuple[int, int]:
    """(splits, bank blocks) for n bank rows in blocks of ``block_n``, filling ``programs``.

    About one split per streaming multiprocessor (``programs``), at least n / MAX_SPLIT_ROWS,
    at most one per block; the kernel hands each split a contiguous run of whole blocks whose
    lengths differ by at most one (n = 10,000 in 64-row blocks: 157 blocks, 132 splits on an
    H100/H200, where rounding rows per split up to whole blocks gave 79).

    >>> plan_splits(10_000, 64, 132)
    (132, 157)
    >>> plan_splits(100, 64, 132)
    (2, 2)
    """
    n_blocks = triton.cdiv(n, block_n)
    if SPLITS is not None:
        return max(1, min(int(SPLITS), n_blocks)), n_blocks
    want = max(programs, triton.cdiv(n, MAX_SPLIT_ROWS))
    return max(1, min(n_blocks, want)), n_blocks


def _programs(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@launches_on_input
def softmax_state(
    phi: torch.Tensor,
    y: torch.Tensor | None,
    side: BankSide,
    state: State | None = None,
    shift: None = None,
) -> State:
    """Online-softmax state (m (b,), l (b,), acc (b, D)) over ``bank``, by the Triton kernel.

    Same arguments (``state``: an initial state merged in the combine; no fixed ``shift``: the
    kernel keeps a running max in registers, which costs nothing there) and result as
    ``ops.guidance_torch.softmax_state`` (m in phi's dtype; l and acc summed across the splits
    in float64; each split sums its rows in the compute dtype); the cached squared norms of
    ``side`` are not read (the kernel computes them from the rows it loads anyway).
    """
    bank, bank_cond, inv_s2, inv_c2 = side.bank, side.bank_cond, side.inv_s2, side.inv_c2
    check_device(phi)
    if shift is not None:
        raise ValueError("the Triton kernel keeps its running max in registers: shift must be None")
    cdt = phi.dtype
    b, dim = phi.shape
    n = bank.shape[0]
    if n == 0:
        if state is not None:
            return state[0], state[1].double(), state[2].double()
        return (
            torch.full((b,), float("-inf"), dtype=cdt, device=phi.device),
            torch.zeros((b,), dtype=torch.float64, device=phi.device),
            torch.zeros((b, dim), dtype=torch.float64, device=phi.device),
        )
    fp64 = cdt == torch.float64
    block_b, block_n, block_d, block_m, warps = _blocks(b, phi.device, fp64)
    splits, n_blocks = plan_splits(n, block_n, _programs(phi.device))
    phi = _rows(phi)
    bank = _rows(bank)
    has_cond = y is not None
    y_arg = _rows(y) if has_cond else phi
    c_arg = _rows(bank_cond) if has_cond else bank
    cdim = y.shape[1] if has_cond else 0
    # 1/s^2, 1/s_c^2 in the compute dtype, written on the device (fill kernels: no blocking
    # host-to-device copy, and capturable in a CUDA graph)
    scal = torch.full((2,), inv_c2, dtype=cdt, device=phi.device)
    scal[:1].fill_(inv_s2)
    acc = torch.zeros((splits, b, dim), dtype=cdt, device=phi.device)
    m = torch.zeros((splits, b), dtype=cdt, device=phi.device)
    l = torch.zeros((splits, b), dtype=cdt, device=phi.device)
    grid = (splits, triton.cdiv(b, block_b))
    _guidance_state_kernel[grid](
        phi,
        bank,
        y_arg,
        c_arg,
        acc,
        m,
        l,
        b,
        n,
        dim,
        cdim,
        n_blocks,
        phi.stride(0),
        bank.stride(0),
        y_arg.stride(0),
        c_arg.stride(0),
        scal,
        HAS_COND=has_cond,
        FP64=fp64,
        FMA=fp64 or block_b < 16,
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        num_warps=warps,
    )
    # combine the splits (and the initial state): rescale each to the global max; the sums
    # across splits in float64, like the torch paths' sums across chunks
    l, acc = l.double(), acc.double()
    if state is not None:
        m = torch.cat([m, state[0].unsqueeze(0)])
        l = torch.cat([l, state[1].double().unsqueeze(0)])
        acc = torch.cat([acc, state[2].double().unsqueeze(0)])
    return merge_states(m, l, acc)
