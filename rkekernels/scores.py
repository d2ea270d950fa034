"""Exact Gaussian-kernel RKE scores, streamed tile by tile: O(n) memory, with gradients.

Public functions: `rke_score`, `cond_rke_score`, `rke_entropies`, `median_bandwidth`.
All share one validated path: inputs -> `ops.pair_sums.pair_sums` (three float64 pair sums, any
number of bandwidths in one pass, torch or Triton backend) -> a few scalar expressions.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._bandwidth import (  # (the unused ones: still imported from here by the evaluation code)
    _default_from_tensor,
    _median_from_tensor,
    _median_of,  # noqa: F401
    _pair,
    _prepare,
    _resolve_sigma,  # noqa: F401
    _subsample_sq_dists,  # noqa: F401
    bandwidth_from_tensor,  # noqa: F401
)
from ._input import to_output
from ._methods import check_kernel, pick_method, reject_bandwidth
from .ops import kernel_entropy
from .ops.pair_sums import pair_sums

__all__ = [
    "RKEEntropies",
    "cond_rke_score",
    "default_bandwidth",
    "median_bandwidth",
    "rke_entropies",
    "rke_score",
]


class RKEEntropies(NamedTuple):
    """Order-2 Rényi kernel entropies, in nats.

    Attributes:
        h_x: H2(X) = -log(sum_ij Kx^2 / n^2)
        h_t: H2(T) = -log(sum_ij Kt^2 / n^2)
        h_xt: H2(X, T) = -log(sum_ij Kx^2 Kt^2 / n^2)
        h_x_given_t: H2(X | T) = H2(X, T) - H2(T)
        mutual_info: I2(X; T) = H2(X) + H2(T) - H2(X, T)
    """

    h_x: Any
    h_t: Any
    h_xt: Any
    h_x_given_t: Any
    mutual_info: Any


def median_bandwidth(x: Any) -> float:
    """The median pairwise Euclidean distance (the default before `default_bandwidth`).

    sigma = median_{i<j} ||x_i - x_j||, over all pairs when n <= 1,000, else over the pairs of
    1,000 rows drawn with a fixed seed (so the result is deterministic and O(n) to compute).
    With this sigma a pair at the median distance has k_sigma(a, b)^2 = exp(-1).
    Degenerate sets: n = 1 gives 1.0; if more than half of the pairs coincide, the mean of the
    positive distances; all points equal gives 1.0 (every bandwidth then gives the same score).

    Args:
        x: (n, d) samples (torch tensor, numpy array or ``__dlpack__`` array).

    Returns:
        float: the bandwidth.

    Example:
        >>> import numpy as np, rkekernels
        >>> rkekernels.median_bandwidth(np.array([[0.0], [1.0], [3.0]]))
        2.0
    """
    return _median_from_tensor(_prepare(x, "x"))


def default_bandwidth(x: Any) -> float:
    """The bandwidth the scores use when sigma is None: the middle of the flattest stretch of
    the score curve, where the count of modes responds least to the bandwidth.

    On at most 1,000 rows (drawn with a fixed seed, as `median_bandwidth`), RKE(sigma) is
    evaluated on 25 bandwidths spaced evenly in log from a quarter of the median
    nearest-neighbour distance to twice the median pairwise distance; of the steps whose score
    lies in [1.5, m / 4] (m rows: neither one mode nor every point its own), the one with the
    smallest |d log RKE / d log sigma| gives sigma (the geometric mean of its two ends)::

        sigma* = argmin_{sigma : 1.5 <= RKE(sigma) <= m/4} |d log RKE(sigma) / d log sigma|

    A set of k well-separated tight groups has a plateau at RKE = k between the within-group
    and the between-group scale, which this finds; a single blob has none, and the flattest
    allowed stretch is at its large-bandwidth end (RKE about 1.5). Unlike the median distance
    (which grows with the spread of the set and so normalises structure away: every set then
    scores about 2.5), this scale sees groups. It is still a per-set choice: scores at two
    sets' own defaults use two different kernels and do not compare; score several sets at
    one shared bandwidth (`rke_scores`) or over a sweep (`rke_sweep`) to compare them.
    Degenerate sets: n = 1 or all points equal give 1.0; no step in the band (n < 6, say)
    gives `median_bandwidth` (x). Study: ``python -m benchmarks.bench_bandwidth``.

    Args:
        x: (n, d) samples, any of the array types `median_bandwidth` takes.

    Returns:
        float: the bandwidth (the same for every call on the same x: the grid is deterministic).

    Example:
        >>> import numpy as np, rkekernels
        >>> rng = np.random.default_rng(0)
        >>> centres = 20.0 * rng.normal(size=(5, 8))
        >>> x = np.concatenate([c + rng.normal(size=(40, 8)) for c in centres])
        >>> round(rkekernels.rke_score(x), 1)           # five groups, at the default
        5.3
        >>> round(rkekernels.rke_score(x, rkekernels.median_bandwidth(x)), 1)  # the median
        2.0
    """
    return _default_from_tensor(_prepare(x, "x"))


def rke_score(x: Any, sigma: Any = None, *, kernel: str = "gaussian", backend: str = "auto"):
    """RKE score (order-2 Rényi kernel entropy, exponentiated): the effective number of modes.

    RKE(X) = exp(H2(X)) = n^2 / sum_ij k_s(x_i, x_j)^2,  k_s(a, b) = exp(-||a - b||^2 / (2 s^2)).

    Equals the order-2 Vendi score of K/n; 1 <= RKE <= n. Exact, streamed over tiles of the
    upper triangle: O(n^2 d) time, O(n d) memory, never an n x n matrix.

    Args:
        x: (n, d) samples: torch tensor (any device), numpy array, or ``__dlpack__`` array.
            Integers become float32; float16/bfloat16 are accumulated in float32.
        sigma: bandwidth s > 0, a sequence of bandwidths (one pass, 1-D result), or None for
            `median_bandwidth` (x).
        kernel: "gaussian" (default), or "cosine" / "linear" (no sigma): then
            RKE = tr(K)^2 / sum_ij K_ij^2 = tr(C)^2 / ||C||_F^2 through the d x d covariance
            C = X^T X (rows normalised for cosine), O(n d^2) time, O(d^2) memory, at any n.
        backend: "auto" (Triton for CUDA tensors when it imports), "torch" or "triton".

    Returns:
        torch input: a 0-dim tensor (1-D for several sigmas) that supports autograd.
        other input: a float (numpy array for several sigmas).

    Raises:
        ValueError: empty x, wrong rank, NaN/Inf, bad sigma, unknown backend or kernel, a
            sigma with the cosine or linear kernel.
        TypeError: complex, string or object data.

    Example:
        >>> import torch, rkekernels
        >>> centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
        >>> x = centres.repeat_interleave(50, dim=0) + 0.01 * torch.randn(150, 2)
        >>> round(float(rkekernels.rke_score(x, sigma=1.0)), 3)
        3.0
    """
    if kernel != "gaussian":  # cosine / linear: order 2 through the covariance
        return _dot_kernel_score(x, sigma, kernel)
    xt, _, sigmas, many, _, backend, torch_out = _pair(x, None, sigma, None, backend)
    n = xt.shape[0]
    fx, _, _ = pair_sums(xt, None, sigmas, None, backend=backend)
    return to_output(scores_from_sums(n, fx)[0].to(xt.dtype), torch_out, many)


def _dot_kernel_score(x: Any, sigma: Any, kernel: Any):
    """`rke_score` for the cosine and linear kernels: the order-2 `rkekernels.vendi_score`
    (method "auto": the d x d covariance when d < n, else the n x n Gram matrix)."""
    kernel = check_kernel(kernel)
    reject_bandwidth(kernel, sigma=sigma)
    # the bandwidths are unused: placeholders, so that _pair only validates the data
    xt, _, _, _, _, backend, torch_out = _pair(x, None, 1.0, 1.0, "auto")
    n, d = xt.shape
    method = pick_method("auto", kernel=kernel, n=n, width=d, q=2.0)
    view = kernel_entropy.View(kernel, (kernel_entropy.dot_part(xt, kernel, "x"),))
    h = kernel_entropy.entropy(view, 2.0, method, {"seed": 0}, backend)
    return to_output(torch.stack([h.exp()]).to(xt.dtype), torch_out, False)


def cond_rke_score(
    x: Any, t: Any, sigma: Any = None, sigma_t: Any = None, *, backend: str = "auto"
):
    """Conditional RKE of samples given their prompts: exp(H2(X | T)).

    CondRKE(X|T) = sum_ij Kt[i,j]^2 / sum_ij Kx[i,j]^2 Kt[i,j]^2,
    Kx = k_sigma(x_i, x_j), Kt = k_sigma_t(t_i, t_j). Identical prompts give RKE(X); prompts all
    far from each other give 1.

    Args:
        x: (n, d) samples.
        t: (n, m) prompt embeddings, one per sample.
        sigma: bandwidth for x (float, sequence for a 1-D result, or None for the median).
        sigma_t: bandwidth for t (a single float, or None for `median_bandwidth` (t)).
        backend: "auto", "torch" or "triton".

    Returns:
        As `rke_score`: a tensor with autograd (w.r.t. x and t) for torch input, else a float.

    Example:
        >>> import torch, rkekernels
        >>> x = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
        >>> same = torch.zeros(4, 1)
        >>> round(float(rkekernels.cond_rke_score(x, same, sigma=1.0, sigma_t=1.0)), 6)
        4.0
        >>> two_prompts = torch.tensor([[0.0], [0.0], [50.0], [50.0]])
        >>> round(float(rkekernels.cond_rke_score(x, two_prompts, sigma=1.0, sigma_t=1.0)), 6)
        2.0
    """
    if t is None:
        raise ValueError("t is None: cond_rke_score needs prompt embeddings t of shape (n, m)")
    xt, tt, sigmas, many, st, backend, torch_out = _pair(x, t, sigma, sigma_t, backend)
    _, ft, fxt = pair_sums(xt, tt, sigmas, st, want_fx=False, backend=backend)
    return to_output(scores_from_sums(xt.shape[0], None, ft, fxt)[1].to(xt.dtype), torch_out, many)


def rke_entropies(
    x: Any, t: Any, sigma: Any = None, sigma_t: Any = None, *, backend: str = "auto"
) -> RKEEntropies:
    """The full order-2 entropy decomposition of samples and prompts, in nats, in one pass.

    H2(X) = -log(sum Kx^2 / n^2), H2(T) = -log(sum Kt^2 / n^2), H2(X,T) = -log(sum Kx^2 Kt^2 / n^2),
    H2(X|T) = H2(X,T) - H2(T), I2(X;T) = H2(X) + H2(T) - H2(X,T).

    Args:
        x: (n, d) samples. t: (n, m) prompt embeddings.
        sigma, sigma_t, backend: as in `cond_rke_score`.

    Returns:
        RKEEntropies(h_x, h_t, h_xt, h_x_given_t, mutual_info): tensors with autograd for torch
        input (1-D over sigma when several are given; h_t is then repeated), floats otherwise.

    Example:
        >>> import torch, rkekernels
        >>> x = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
        >>> t = torch.tensor([[0.0], [0.0], [50.0], [50.0]])
        >>> e = rkekernels.rke_entropies(x, t, sigma=1.0, sigma_t=1.0)
        >>> [round(float(v), 4) for v in e]  # log 4, log 2, log 4, log 2, log 2
        [1.3863, 0.6931, 1.3863, 0.6931, 0.6931]
    """
    if t is None:
        raise ValueError("t is None: rke_entropies needs prompt embeddings t of shape (n, m)")
    xt, tt, sigmas, many, st, backend, torch_out = _pair(x, t, sigma, sigma_t, backend)
    n = xt.shape[0]
    fx, ft, fxt = pair_sums(xt, tt, sigmas, st, backend=backend)
    vals = entropies_from_sums(n, fx, ft, fxt)
    return RKEEntropies(*(to_output(v.to(xt.dtype), torch_out, many) for v in vals))


def scores_from_sums(n: int, fx, ft=None, fxt=None) -> tuple:
    """(RKE, CondRKE) from the pair sums (SPEC section 2): RKE = n^2 / F_x, CondRKE = F_t / F_xt.

    The one place the two ratios are written: the one-process, distributed and streaming scores
    all call it. Each is None when its sums are (``fx`` None, or ``ft``/``fxt`` None).

    Example:
        >>> import torch
        >>> scores_from_sums(4, torch.tensor([8.0]), torch.tensor(12.0), torch.tensor([6.0]))
        (tensor([2.]), tensor([2.]))
    """
    rke = n * n / fx if fx is not None else None
    cond = ft / fxt if ft is not None and fxt is not None else None
    return rke, cond


def entropies_from_sums(n: int, fx, ft, fxt) -> tuple:
    """(H2(X), H2(T), H2(X,T), H2(X|T), I2(X;T)) from the pair sums (SPEC section 2).

    The one place the decomposition is written: the one-process, distributed and streaming
    scores all call it. ``fx`` and ``fxt`` are (K,) over the bandwidths; H2(T) is repeated.
    """
    log_n2 = 2.0 * math.log(n)
    h_x = log_n2 - torch.log(fx)
    h_t = (log_n2 - torch.log(ft)).expand_as(h_x)
    h_xt = log_n2 - torch.log(fxt)
    return h_x, h_t, h_xt, h_xt - h_t, h_x + h_t - h_xt
