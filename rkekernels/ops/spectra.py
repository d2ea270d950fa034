"""Kernel spectra behind the order-q scores: exact, covariance, RFF, Nystrom and Lanczos paths.

Every score of order q needs the eigenvalues p_1..p_n of K / tr(K) (they sum to 1)::

    H_q = log(sum_i p_i^q) / (1 - q),   H_1 = -sum_i p_i log p_i,   H_inf = -log max_i p_i

The paths below produce those eigenvalues (or, for Lanczos, the top k of them) without ever
holding more than they must:

- ``exact``: the dense n x n kernel matrix in float64 and ``torch.linalg.eigvalsh``.
  Memory 16 n^2 bytes at the peak: K and the copy LAPACK overwrites (n = 10,000: 1.55 GiB
  measured).
- feature paths: a feature map phi with K ~= Phi Phi^T; the nonzero eigenvalues of Phi Phi^T are
  those of the D x D covariance Phi^T Phi, accumulated over row blocks (O(D^2) memory):
  ``covariance`` (linear: phi = x; cosine: x / ||x||; a Hadamard product of kernels is the
  row-wise Kronecker product of the feature maps, so conditional scores stay exact),
  ``rff`` (random Fourier features [cos(u W), sin(u W)] / sqrt(D/2), W ~ N(0, I), for the unit
  Gaussian kernel exp(-||u - v||^2 / 2) of the scaled data u = x / sigma; phi(u).phi(u) = 1)
  and ``nystrom`` (phi = K(u, L) K(L, L)^{-1/2} on m landmark rows L drawn with the seed).
- ``lanczos``: the top-k eigenvalues of the unit Gaussian kernel by ARPACK
  (``scipy.sparse.linalg.eigsh``) on a matrix-free operator that recomputes kernel row blocks
  for each product: O(n d) memory, no n x n matrix.

Gaussian paths work on u = (x - mean) / sigma with the unit bandwidth: the joint kernel of the
conditional scores, k_sx(x, x') k_st(t, t'), is the unit Gaussian kernel of [x / sx, t / st].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import lapack

__all__ = [
    "covariance",
    "dot_features",
    "gaussian_gram",
    "lanczos_top",
    "mean_rows",
    "nystrom_map",
    "order2_entropy_from_cov",
    "renyi_entropy",
    "rff_map",
    "row_blocks",
    "spectrum_of_cov",
]

FeatureMap = Callable[[int, int], torch.Tensor]  # (i0, i1) -> (i1 - i0, D) features of rows

_BLOCK_BYTES = 32 * 2**20


def row_blocks(n: int, width: int, itemsize: int = 4) -> list[tuple[int, int]]:
    """Row blocks [i0, i1) of about 32 MiB each for a (rows, width) temporary."""
    rows = max(256, _BLOCK_BYTES // max(1, width * itemsize))
    return [(i0, min(i0 + rows, n)) for i0 in range(0, n, rows)]


def mean_rows(*mats: torch.Tensor) -> torch.Tensor:
    """The float64 mean (d,) of the rows of all ``mats`` (each (n_i, d)), summed in row blocks
    (a float64 sum of the whole matrix would first copy it to float64).

    Example:
        >>> mean_rows(torch.ones(3, 2), torch.zeros(1, 2)).tolist()
        [0.75, 0.75]
    """
    total = torch.zeros(mats[0].shape[1], dtype=torch.float64, device=mats[0].device)
    for a in mats:
        for i0, i1 in row_blocks(a.shape[0], a.shape[1], 8):
            total += a[i0:i1].sum(0, dtype=torch.float64)
    return total / max(sum(a.shape[0] for a in mats), 1)


def renyi_entropy(
    p: torch.Tensor, q: float, tail_mass: torch.Tensor | float = 0.0, tail_count: int = 0
) -> torch.Tensor:
    """Order-q Rényi entropy (nats) of a probability vector, differentiable.

    Entries at or below len(p) * eps * max(p) count as 0: they are round-off in the eigenvalues
    of a PSD matrix (the numerical-rank cut of ``torch.linalg.matrix_rank``); vendi-score drops
    only entries <= 0, which differs by O(n eps) for q >= 1 but lets noise decide orders q < 1
    of a rank-deficient K. ``tail_mass`` spread evenly over ``tail_count`` further entries
    completes a truncated spectrum (the Lanczos path): the maximum-entropy completion, and a
    valid one since each share is at most the smallest computed eigenvalue.
    """
    p = p.to(torch.float64)
    pos = p > len(p) * torch.finfo(torch.float64).eps * p.detach().max()
    safe = torch.where(pos, p, torch.ones_like(p))
    tail = torch.as_tensor(tail_mass, dtype=torch.float64, device=p.device)
    has_tail = tail_count > 0 and float(tail) > 0.0
    if q == 1.0:
        h = -torch.where(pos, safe * safe.log(), torch.zeros_like(p)).sum()
        if has_tail:
            h = h - tail * torch.log(tail / tail_count)
        return h
    if math.isinf(q):
        top = p.max()
        if has_tail:
            top = torch.maximum(top, tail / tail_count)
        return -torch.log(top)
    s = torch.where(pos, safe**q, torch.zeros_like(p)).sum()
    if has_tail:
        s = s + tail_count * (tail / tail_count) ** q
    return torch.log(s) / (1.0 - q)


def gaussian_gram(u: torch.Tensor) -> torch.Tensor:
    """Dense unit Gaussian kernel exp(-||u_i - u_j||^2 / 2), float64 (n, n), diagonal exactly 1.

    In place (8 n^2 bytes) when no gradient is needed; out of place (autograd) otherwise.
    """
    u = u.to(torch.float64)
    nrm = (u * u).sum(1)
    g = u @ u.T
    if torch.is_grad_enabled() and u.requires_grad:
        d2 = (nrm[:, None] + nrm[None, :] - 2.0 * g).clamp(min=0.0)
        d2 = d2 * (1.0 - torch.eye(len(u), dtype=d2.dtype, device=d2.device))
        return torch.exp(-0.5 * d2)
    g.mul_(-2.0).add_(nrm[:, None]).add_(nrm[None, :]).clamp_(min=0.0)
    g.fill_diagonal_(0.0)
    return g.mul_(-0.5).exp_()


def dot_features(parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> FeatureMap:
    """Feature map of the Hadamard product of linear kernels: the row-wise Kronecker product.

    (x_i . x_j)(t_i . t_j) = (x_i kron t_i) . (x_j kron t_j); one matrix gives its rows.
    ``parts`` holds (matrix, row scale (n, 1) or None) pairs: the cosine kernel's 1 / ||x_i||
    is applied block by block, so no normalised copy of the data is ever made.
    """

    def rows(m: torch.Tensor, scale: torch.Tensor | None, i0: int, i1: int) -> torch.Tensor:
        return m[i0:i1] if scale is None else m[i0:i1] * scale[i0:i1]

    def fmap(i0: int, i1: int) -> torch.Tensor:
        f = rows(*parts[0], i0, i1)
        for m, scale in parts[1:]:
            g = rows(m, scale, i0, i1)
            f = (f[:, :, None] * g[:, None, :]).reshape(i1 - i0, -1)
        return f

    return fmap


def covariance(fmap: FeatureMap, n: int, width: int, device, dtype) -> torch.Tensor:
    """C = Phi^T Phi (width x width, float64), summed over row blocks of the features.

    Each block's GEMM runs in the feature dtype (float32 stays float32 for speed); the blocks
    are added in float64. Memory: O(width^2) plus one block of features.
    """
    cov = torch.zeros(width, width, dtype=torch.float64, device=device)
    for i0, i1 in row_blocks(n, width, torch.finfo(dtype).bits // 8):
        f = fmap(i0, i1)
        cov = cov + (f.T @ f).to(torch.float64)
    return cov


def spectrum_of_cov(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of C / tr(C) (float64, they sum to 1; differentiable)."""
    return lapack.eigvalsh(cov) / torch.trace(cov)


def order2_entropy_from_cov(cov: torch.Tensor) -> torch.Tensor:
    """H_2 = -log(||C||_F^2 / tr(C)^2) (= -log sum_ij K_ij^2 / tr(K)^2), no eigenvalues."""
    return 2.0 * torch.log(torch.trace(cov)) - torch.log((cov * cov).sum())


def rff_map(
    u: torch.Tensor,
    dim: int,
    seed: int,
    *,
    shift: torch.Tensor | None = None,
    inv_scale: float = 1.0,
) -> FeatureMap:
    """Random Fourier features of the unit Gaussian kernel exp(-||u - v||^2 / 2).

    phi(u) = [cos(u W), sin(u W)] / sqrt(h), W (d, h) ~ N(0, 1) drawn on the CPU from ``seed``
    (the same draws on every device), h = dim / 2 frequencies: phi(u).phi(v) is the mean of
    cos((u - v) . w_k), an unbiased estimate of the kernel, and phi(u).phi(u) = 1 exactly.
    ``shift`` (d,) and ``inv_scale``: the features of (u - shift) * inv_scale, folded into W
    and a phase (no copy of u): (u W' - shift W') with W' = W inv_scale.
    """
    h = dim // 2
    gen = torch.Generator().manual_seed(int(seed))
    w64 = torch.randn(u.shape[1], h, generator=gen, dtype=torch.float64)
    w = (w64 * inv_scale if inv_scale != 1.0 else w64).to(device=u.device, dtype=u.dtype)
    phase = None
    if shift is not None:
        phase = (shift.to(device=u.device, dtype=torch.float64) @ w64 * inv_scale).to(u.dtype)
    scale = 1.0 / math.sqrt(h)
    grad = torch.is_grad_enabled() and u.requires_grad

    def fmap(i0: int, i1: int) -> torch.Tensor:
        p = u[i0:i1] @ w
        if phase is not None:
            p = p - phase
        if grad:
            return torch.cat([torch.cos(p), torch.sin(p)], 1) * scale
        z = torch.empty(i1 - i0, 2 * h, dtype=p.dtype, device=p.device)
        torch.cos(p, out=z[:, :h])
        torch.sin(p, out=z[:, h:])
        return z.mul_(scale)

    return fmap


def _unit_gauss_cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(-||a_i - b_j||^2 / 2) (float64 (len(a), len(b)))."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    d2 = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp(min=0.0)
    return torch.exp(-0.5 * d2)


def nystrom_map(u: torch.Tensor, m: int, seed: int) -> tuple[FeatureMap, int]:
    """Nystrom features phi(u) = K(u, L) V diag(w)^{-1/2} on m landmarks L (rows drawn by seed).

    K(L, L) = V diag(w) V^T; eigenvalues below 1e-12 max(w) are dropped (pseudo-inverse), so
    Phi Phi^T = K_nL K_LL^+ K_Ln, the Nystrom approximation of K. Returns (map, width).
    """
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(u.shape[0], generator=gen)[:m].to(u.device)
    land = u.index_select(0, idx)
    w, v = lapack.eigh(_unit_gauss_cross(land, land))
    keep = w > w.max() * 1e-12
    proj = v[:, keep] / w[keep].sqrt()

    def fmap(i0: int, i1: int) -> torch.Tensor:
        return _unit_gauss_cross(u[i0:i1], land) @ proj

    return fmap, int(keep.sum())


def lanczos_top(
    u: torch.Tensor, k: int, *, vectors: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Top-k eigenvalues (descending; and eigenvectors (n, k)) of the unit Gaussian kernel of u.

    ARPACK's implicitly restarted Lanczos on a LinearOperator whose product K @ v recomputes
    each row block of K from u: O(n^2 d) time per product, O(n d + block * n) memory.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    ud = u.detach().to(torch.float64)
    n = ud.shape[0]
    nrm = (ud * ud).sum(1)
    blocks = row_blocks(n, n, 8)

    def matmat(v: np.ndarray) -> np.ndarray:
        vt = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(n, -1), device=ud.device)
        out = torch.empty(n, vt.shape[1], dtype=torch.float64, device=ud.device)
        for i0, i1 in blocks:
            kb = torch.addmm(nrm[None, :], ud[i0:i1], ud.T, alpha=-2.0)
            kb.add_(nrm[i0:i1, None]).clamp_(min=0.0).mul_(-0.5).exp_()
            torch.matmul(kb, vt, out=out[i0:i1])
        return out.cpu().numpy()

    op = LinearOperator((n, n), matvec=matmat, matmat=matmat, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    res = eigsh(op, k=k, which="LA", v0=v0, return_eigenvectors=vectors)
    if vectors:
        vals, vecs = res
        order = np.argsort(vals)[::-1]
        return vals[order], vecs[:, order]
    return np.sort(res)[::-1], None
