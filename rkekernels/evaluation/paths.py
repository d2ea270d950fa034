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
"""

from __future__ import annotations

import functools
import math
import time

import torch

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

__all__ = ["APPROX_DIM", "EXACT_MIN_S", "EXACT_SHARE", "SWEEP_DIM", "pick_eigen", "shared_sums"]


@functools.cache
def _probe(solver: str) -> float:
    """Seconds of one float64 ``solver`` ("eigvalsh", "eigh" or "eig") at PROBE_N (best of 3)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(PROBE_N, PROBE_N, generator=gen, dtype=torch.float64)
    a = a @ a.T / PROBE_N
    fn = getattr(torch.linalg, solver)
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
