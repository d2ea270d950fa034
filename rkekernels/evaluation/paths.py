"""Which path computes each output of `evaluate`: the shared exact pass and the eigen crossover.

The floor of `evaluate` is the exact pair sums (O(n^2 d)): RKE, its jackknife interval, the most
/ least crowded samples and the sweep's RKE all come from the per-sample sums
s_i = sum_j k(x_i, x_j)^2, so they are computed in ONE tiled pass over every bandwidth at once
(`shared_sums`; one GEMM per tile, shared by all sigmas).

The eigen outputs (Vendi, the modes, KEN novelty) are O(n^3) when exact. Each runs exact while
its predicted time is at most ``max(EXACT_SHARE * floor, EXACT_MIN_S)``, the floor being the
measured time of the shared pass in the same run, or no slower than the predicted rff path,
else through ``APPROX_DIM`` random Fourier features (`pick_eigen`; sets of at most APPROX_DIM
rows stay exact). The prediction scales a probe measured once per process on this
machine: the time of a float64 eigensolver on a ``PROBE_N`` x ``PROBE_N`` matrix, times
(size / PROBE_N)^3 (the solvers' cost), plus the Gram matrix's build at the floor's rate.

The approximate paths state their error (``methods_error``): 1 / sqrt(dim), the bound on the
standard deviation of one random-feature kernel entry (a mean of dim / 2 cosines, each of
variance at most 1/2); the eigenvalues of K / n move by about as much.

Pair passes over other sets follow the same rule (`pick_pairs`): the cross pairs of relative
RKE (n m of them) run exact while their predicted time at the shared pass's measured rate is
within max(EXACT_SHARE x floor, EXACT_MIN_S), else through `cross_rff` (whose stated error is
its measured standard error); the reference's sweep (report) runs on all m rows while m^2 / 2
pairs fit REF_SHARE (1/4) x the floor, else on a seeded subsample of the rows that fit; KEN's
null gets NULL_SHARE (1/4) of the floor (`null_dim`).
"""

from __future__ import annotations

import functools
import math
import time

import torch

from ..ops import lapack, spectra
from .statistics import _sums

#: an exact eigen path (its Gram build included, about one pass) runs while its predicted time is
#: at most EXACT_SHARE x the shared pass (so the eigensolver alone gets half a pass) ...
EXACT_SHARE = 1.5
#: ... or at most this many seconds, whichever is larger (small sets stay exact)
EXACT_MIN_S = 2.0
#: random Fourier features of the approximate eigen paths
APPROX_DIM = 1024
#: random Fourier features of the report's sweep (9 Vendi values drawn as a curve) when rff
SWEEP_DIM = 256
#: the size of the eigensolver probe
PROBE_N = 384
#: the reference's sweep (report only) gets at most this share of the shared pass's time
REF_SHARE = 0.25
#: KEN's null (its eigenproblems) gets at most this share of the shared pass's time (or
#: EXACT_MIN_S)
NULL_SHARE = 0.25
#: random Fourier features (dim / 2 frequencies) of the approximate relative RKE
CROSS_DIM = 4096
#: the fewest random features KEN with a null is given (`null_dim`)
MIN_NULL_DIM = 128

__all__ = [
    "APPROX_DIM",
    "CROSS_DIM",
    "EXACT_MIN_S",
    "EXACT_SHARE",
    "MIN_NULL_DIM",
    "NULL_SHARE",
    "REF_SHARE",
    "SWEEP_DIM",
    "cross_rff",
    "null_dim",
    "pick_eigen",
    "pick_pairs",
    "ref_rows",
    "shared_sums",
]


@functools.cache
def _probe(solver: str) -> float:
    """Seconds of one float64 ``solver`` ("eigvalsh", "eigh" or "eig") at PROBE_N (best of 3)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PROBE_N, PROBE_N, generator=gen, dtype=torch.float64)
    a = a @ a.T / PROBE_N
    fn = getattr(lapack, solver)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        fn(a)
        best = min(best, time.perf_counter() - t0)
    return best


def exact_seconds(size: int, solver: str, count: int, floor_s: float, n: int) -> float:
    """Predicted seconds of ``count`` exact eigen problems of ``size`` rows (Gram build included).

    (size / PROBE_N)^3 x the probe of ``solver``, plus the Gram matrix of size^2 pairs at the
    measured rate of the shared pass (``floor_s`` for n^2 pairs).
    """
    gram = floor_s * (size / max(n, 1)) ** 2
    return count * (_probe(solver) * (size / PROBE_N) ** 3 + gram)


def approx_seconds(
    size: int, solver: str, count: int, floor_s: float, n: int, d: int, dim: int
) -> float:
    """Predicted seconds of ``count`` rff problems of ``size`` rows with D = ``dim`` features.

    The D x D eigenproblem (the probe scaled by (D / PROBE_N)^3), the features (size x d x D / 2
    multiply-adds) and their covariance (size x D^2), both at the shared pass's measured rate
    (``floor_s`` for the n^2 d / 2 multiply-adds of n^2 / 2 pairs).
    """
    rate = floor_s / max(n * n * d / 2.0, 1.0)  # seconds per multiply-add in the pass
    work = size * d * dim / 2.0 + size * dim * dim
    return count * (_probe(solver) * (dim / PROBE_N) ** 3 + rate * work)


def pick_eigen(
    size: int, solver: str, count: int, floor_s: float, n: int, d: int, dim: int | None = None
) -> tuple[str, float]:
    """("exact", 0.0) while the exact path is predicted cheap enough, else ("rff", 1/sqrt(dim)).

    ``dim``: the rff features (None: APPROX_DIM).

    Cheap enough: predicted time (`exact_seconds`) <= max(EXACT_SHARE * floor_s, EXACT_MIN_S),
    or no slower than the predicted rff path (`approx_seconds`; always so when size <= dim).
    """
    dim = dim or APPROX_DIM
    if size <= max(PROBE_N, dim):
        return "exact", 0.0
    exact = exact_seconds(size, solver, count, floor_s, n)
    approx = approx_seconds(size, solver, count, floor_s, n, d, dim)
    if exact <= max(EXACT_SHARE * floor_s, EXACT_MIN_S, approx):
        return "exact", 0.0
    return "rff", 1.0 / math.sqrt(dim)


def shared_sums(x: torch.Tensor, sigmas: list[float]) -> tuple[torch.Tensor, float]:
    """Per-sample sums s[k, i] = sum_j k_{sigma_k}(x_i, x_j)^2 (float64 (K, n)) in one pass.

    The sums of `rkekernels.evaluation.sample_sums` for every bandwidth of ``sigmas`` at once
    (one GEMM per tile); returns them with the pass's wall time in seconds (the floor).
    """
    t0 = time.perf_counter()
    sx = _sums(x, None, list(sigmas), None)[4]
    return sx, time.perf_counter() - t0


def pick_pairs(pairs: float, floor_s: float, n: int) -> str:
    """ "exact" while ``pairs`` kernel pairs are predicted to take at most
    max(EXACT_SHARE x floor_s, EXACT_MIN_S) at the shared pass's rate (floor_s for its
    n (n + 1) / 2 pairs), else "rff"."""
    predicted = floor_s * pairs / max(n * (n + 1) / 2.0, 1.0)
    return "exact" if predicted <= max(EXACT_SHARE * floor_s, EXACT_MIN_S) else "rff"


def ref_rows(m: int, n: int, seed: int = 0) -> torch.Tensor | None:
    """The reference rows of the report's sweep: None (all m) while m^2 / 2 pairs fit
    REF_SHARE x the shared pass over n rows, else a seeded subsample of n sqrt(REF_SHARE) rows
    (sorted indices)."""
    keep = int(n * math.sqrt(REF_SHARE))
    if m <= max(keep, 2):
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(m, generator=gen)[:keep].sort().values


def cross_rff(
    x: torch.Tensor, y: torch.Tensor, sigma: float, dim: int | None = None, seed: int = 0
) -> tuple[float, float]:
    """Relative RKE n m / sum_ij k_s(x_i, y_j)^2 through random Fourier features, with its
    stated relative error.

    k_s(a, b)^2 = exp(-||a - b||^2 / s^2) is the Gaussian kernel of bandwidth s / sqrt(2).
    With h = dim / 2 frequencies w_k ~ N(0, 2 / s^2 I) (`rkekernels.ops.spectra.rff_map` on
    (x - c) sqrt(2) / s, c the mean of both sets)::

        sum_ij k_s(x_i, y_j)^2 ~= mean_k e_k,
        e_k = Re(sum_i exp(i w_k.x_i) conj(sum_j exp(i w_k.y_j)))

    each e_k an unbiased estimate (the frequencies are independent), so the stated error is the
    standard error of the mean of e_k relative to it (a delta-method relative error of the
    relative RKE). Cost O((n + m) d dim / 2) in row blocks; memory O(dim + block).

    Args:
        x: (n, d), y: (m, d) features. sigma: the bandwidth. dim: features (None: CROSS_DIM).
        seed: the frequencies' seed.

    Returns:
        (relative RKE, relative standard error).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(300, 3, generator=g), torch.randn(400, 3, generator=g)
        >>> est, err = cross_rff(x, y, 1.0, dim=4096)
        >>> exact = 300 * 400 / torch.exp(-torch.cdist(x, y) ** 2).sum()
        >>> abs(est / float(exact) - 1) < 3 * err, err < 0.1
        (True, True)
    """
    dim = dim or CROSS_DIM
    c = spectra.mean_rows(x, y)
    h = dim // 2
    sums = []
    for a in (x, y):  # the features of (a - c) sqrt(2) / sigma, without a copy of a
        fmap = spectra.rff_map(a, dim, seed, shift=c, inv_scale=math.sqrt(2.0) / sigma)
        acc = torch.zeros(dim, dtype=torch.float64, device=a.device)
        for i0, i1 in spectra.row_blocks(a.shape[0], dim):
            acc += fmap(i0, i1).sum(0, dtype=torch.float64)
        sums.append(acc * math.sqrt(h))  # undo the 1 / sqrt(h) of the map
    e = sums[0][:h] * sums[1][:h] + sums[0][h:] * sums[1][h:]  # (h,) one estimate per frequency
    mean = float(e.mean())
    se = float(e.std()) / math.sqrt(h)
    if mean <= 0.0:
        return math.inf, math.inf
    return len(x) * len(y) / mean, se / mean


def null_dim(draws: int, floor_s: float) -> int:
    """The random features of KEN (rff) with a null of ``draws`` draws: the largest
    APPROX_DIM / 2^j (>= MIN_NULL_DIM) whose draws, one dim x dim float64 eigvalsh each (the
    probe scaled by (dim / PROBE_N)^3), are predicted within max(NULL_SHARE x floor_s,
    EXACT_MIN_S).

    Example:
        >>> null_dim(0, 1.0) == APPROX_DIM
        True
    """
    dim = APPROX_DIM
    budget = max(NULL_SHARE * floor_s, EXACT_MIN_S)
    while dim > MIN_NULL_DIM and draws * _probe("eigvalsh") * (dim / PROBE_N) ** 3 > budget:
        dim //= 2
    return dim
