"""The expected error of the approximate spectra (rff, nystrom) and the data-aware method="auto".

Error model (relative error of Vendi_q, approximate / exact - 1; both methods are biased LOW on
flat spectra), fitted to ``benchmarks/bench_vendi.py``'s accuracy table (digits 1,797 x 64 and
digits + N(0, 0.5^2) noise to 6,000 rows at sigma = 20 and at `default_bandwidth`, a 10-cluster
mixture; 2 seeds)::

    error = -x / (1 + x)
    rff, D features:  x = c_q V_q / D,  c_1 = max(1, 0.55 + 0.33 ln(n / V_1)),
                      c_q = c_1 / q + 1 - 1 / q (q >= 1);  seed spread about 2 / sqrt(D)
    nystrom, m rows:  x = 3.3 (0.2 + 0.8 / q) (1 - m / n) V_1 / m

with V_q the exact Vendi score of order q. Why V / D: D random features estimate each kernel
entry with variance about (1 - k^2)^2 / D, which adds about 1 / D to sum_i p_i^2, so Vendi_2
-> 1 / (1 / V_2 + 1 / D) (x = V_2 / D); order 1 loses more the longer the spectrum's tail
(n / V), and a dominant eigenvalue (q = inf) is nearly unbiased but fluctuates by about
2 / sqrt(D). Nystrom keeps only the kernel mass its m landmarks span (exact at m = n), which
hits every order (q = 2 about half, q = inf a fifth of the order-1 loss). Measured (q = 1):
digits at sigma = 20 (V_1 = 310 of 1,797): rff D = 4,096 -9.0% (model -7.9%), D = 8,192
-4.3% (-4.1%); the 6,000-row set (V_1 = 359): -12.1% (-11.5%) and -6.0% (-6.1%); nystrom
m = 1,024 -34% (-31%) and -50% (-49%).

`log_expected` states this error for a computed approximate score: it inverts the model to
estimate V from the approximate value, and logs (logger ``rkekernels.vendi``, INFO) the method,
dim and expected relative error (the inversion carries the model's scatter, a few points).
`refine_auto` is the Gaussian order-q != 2 choice of
method="auto" past the exact budget: it estimates V_q at full n from the exact Vendi of 500 and
1,000 rows (a power law through the two, exponent in [0, 1]: an over-estimate on saturating
spectra, so the predicted error errs high), and takes the smallest RFF dim (the default
doubled up to RFF_DIM_CAP, below n) whose predicted |error| (bias + spread) is within
TARGET_REL_ERROR and whose modelled time beats exact; otherwise exact, with a note.

Time model (2 cores, float64 LAPACK; measured by ``benchmarks/bench_vendi.py``): exact
eigvalsh 3.65 s at n = 4,000 -> EXACT_SECONDS_PER_N3 n^3; the RFF covariance 328 s for
n = 1e6, D = 4,096, d = 768 -> FEATURE_SECONDS_PER_MAC n D (D + d), plus its D^3 eigensolver.
"""

from __future__ import annotations

import logging
import math

import torch

from .ops import lapack, spectra

__all__ = [
    "EXACT_BUDGET_S",
    "EXACT_SECONDS_PER_N3",
    "FEATURE_SECONDS_PER_MAC",
    "RFF_DIM_CAP",
    "TARGET_REL_ERROR",
    "exact_seconds",
    "expected_rel_error",
    "log_expected",
    "refine_auto",
    "rff_seconds",
]

logger = logging.getLogger("rkekernels.vendi")

#: what method="auto" aims for: |relative error of the returned Vendi_q| within 5%
TARGET_REL_ERROR = 0.05
#: exact: eigvalsh of the n x n float64 matrix, seconds per n^3 on 2 cores (3.65 s at n = 4,000)
EXACT_SECONDS_PER_N3 = 5.7e-11
#: rff: seconds per multiply-add of the streamed covariance (float32, 2 cores)
FEATURE_SECONDS_PER_MAC = 1.6e-11
#: method="auto" takes exact whenever its modelled time is within this budget (n <= 6,410)
EXACT_BUDGET_S = 15.0
#: the largest RFF dim method="auto" raises to (a 16,384^2 float64 covariance is 2 GiB)
RFF_DIM_CAP = 16384
#: rows of the two subsamples whose exact Vendi_q estimates the flatness
PROBE_ROWS = (500, 1000)


def _rff_factor(q: float, vendi: float, n: int) -> float:
    """c_q: 0.55 + 0.33 ln(n / V) at q = 1 (at least 1), tending to 1 as q grows (1 / q mix)."""
    c1 = max(1.0, 0.55 + 0.33 * math.log(max(n / vendi, 1.0)))
    return c1 / q + (1.0 - 1.0 / q) if q >= 1.0 else c1 / q


def expected_rel_error(method: str, q: float, vendi: float, dim: int, n: int) -> float:
    """The modelled bias (< 0: low) of Vendi_q by ``method`` at ``dim``, from the exact score.

    ``vendi`` is V_q for rff and V_1 for nystrom (the model of each, see the module); the
    result is -x / (1 + x), in (-1, 0]. Example: ``expected_rel_error("rff", 1.0, 310.0, 4096,
    1797)`` is -0.086 (measured on digits at sigma = 20: -0.090).
    """
    if method == "rff":
        x = _rff_factor(q, vendi, n) * vendi / dim
    elif method == "nystrom":
        w = 0.2 + 0.8 / q
        x = 3.3 * w * max(0.0, 1.0 - dim / n) * vendi / dim
    else:
        raise ValueError(f"no error model for method={method!r}")
    return -x / (1.0 + x)


def spread(method: str, dim: int) -> float:
    """The seed-to-seed fluctuation of the relative error (the rff envelope 2 / sqrt(D))."""
    return 2.0 / math.sqrt(dim) if method == "rff" else 0.0


def _invert(method: str, q: float, approx: float, dim: int, n: int) -> float:
    """The exact V whose modelled approximation is ``approx``: the smallest root in
    [approx, n] by bisection (n when there is none: the model saturates)."""

    def gap(v: float) -> float:
        return v * (1.0 + expected_rel_error(method, q, v, dim, n)) - approx

    lo, hi = approx, float(n)
    if gap(hi) < 0.0:
        # not monotone: scan for a sign change first
        grid = [lo * (hi / lo) ** (i / 64) for i in range(65)]
        hi = next((v for v in grid if gap(v) >= 0.0), None)
        if hi is None:
            return float(n)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) < 0.0 else (lo, mid)
    return hi


def log_expected(method: str, q: float, p: torch.Tensor | None, h: torch.Tensor, dim: int, n: int):
    """Log (INFO) the expected relative error of one approximate Vendi_q = exp(h).

    ``p``: the approximate spectrum (its V_1 feeds the nystrom model; None for rff).
    Returns the expected relative error (a float, < 0 when the score is expected low).
    """
    v_q = math.exp(float(h.detach()))
    if method == "nystrom" and p is not None:
        v_1 = math.exp(float(spectra.renyi_entropy(p.detach(), 1.0)))
    else:
        v_1 = v_q
    base = v_1 if method == "nystrom" else v_q
    v_true = _invert(method, q, base, dim, n)
    err = expected_rel_error(method, q, v_true, dim, n)
    logger.info(
        "method=%r dim=%d: Vendi_%g = %.4g, expected relative error %+.1f%% (+-%.1f%%; error "
        "model of rkekernels._approx_error at an estimated exact V = %.4g)",
        method, dim, q, v_q, 100.0 * err, 100.0 * spread(method, dim), v_true,
    )  # fmt: skip
    return err


def exact_seconds(n: int) -> float:
    """Modelled seconds of the exact path (n x n eigvalsh) on 2 cores."""
    return EXACT_SECONDS_PER_N3 * float(n) ** 3


def rff_seconds(n: int, d: int, dim: int) -> float:
    """Modelled seconds of the rff path: streamed covariance plus the eigensolver of its size."""
    size = min(n, dim)
    return FEATURE_SECONDS_PER_MAC * n * dim * (dim + d) + EXACT_SECONDS_PER_N3 * size**3


def probe_vendi(u: torch.Tensor, q: float) -> float:
    """An estimate of Vendi_q of all n rows of the unit-bandwidth data u from two subsamples.

    The exact Vendi_q of the first 500 and 1,000 rows of a fixed-seed permutation, and the
    power law through them (exponent clipped to [0, 1]) taken to n.
    """
    n = u.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(u.device)
    small, large = (min(m, n) for m in PROBE_ROWS)
    vals = []
    for m in (small, large):
        k = spectra.gaussian_gram(u[perm[:m]])
        p = lapack.eigvalsh(k) / torch.trace(k)
        vals.append(float(spectra.renyi_entropy(p, q).exp()))
    if large >= n or small == large:
        return vals[1]
    alpha = min(1.0, max(0.0, math.log(vals[1] / vals[0]) / math.log(large / small)))
    return vals[1] * (n / large) ** alpha


def refine_auto(u: torch.Tensor, q: float, default_dim: int) -> tuple[str, int | None]:
    """method="auto" for the Gaussian kernel past the exact budget: ("rff", dim) or ("exact",
    None), from the predicted error and modelled time (see the module). Logged at INFO."""
    n, d = u.shape
    with torch.no_grad():
        v = probe_vendi(u, q)
    t_exact = exact_seconds(n)
    dim = default_dim
    while dim < n and dim <= max(RFF_DIM_CAP, default_dim):
        err = abs(expected_rel_error("rff", q, v, dim, n)) + spread("rff", dim)
        if err <= TARGET_REL_ERROR and rff_seconds(n, d, dim) < t_exact:
            logger.info(
                "method='auto': rff with dim=%d (n=%d, estimated Vendi_%g = %.4g; expected "
                "relative error %+.1f%% +-%.1f%%, within %.0f%%)",
                dim, n, q, v, 100 * expected_rel_error("rff", q, v, dim, n),
                100 * spread("rff", dim), 100 * TARGET_REL_ERROR,
            )  # fmt: skip
            return "rff", dim
        dim *= 2
    logger.info(
        "method='auto': exact (n=%d, estimated Vendi_%g = %.4g: no rff dim up to %d below n "
        "is predicted within %.0f%% and faster; modelled exact time %.0f s, %.2f GiB)",
        n, q, v, RFF_DIM_CAP, 100 * TARGET_REL_ERROR, t_exact, 16.0 * n * n / 2**30,
    )  # fmt: skip
    return "exact", None
