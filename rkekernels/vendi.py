"""Order-q kernel entropies: Vendi scores, conditional Vendi, their decomposition and modes.

With K_ij = k(x_i, x_j) and p_1..p_n the eigenvalues of K / tr(K) (a probability vector)::

    H_q(X) = log(sum_i p_i^q) / (1 - q)      q > 0, q != 1
    H_1(X) = -sum_i p_i log p_i              (von Neumann; the Vendi score of vendi-score)
    H_inf  = -log max_i p_i
    Vendi_q(X) = exp(H_q(X))                 q = 2 with the Gaussian kernel is rke_score

Kernels: "gaussian" exp(-||a - b||^2 / (2 sigma^2)) (not squared, k(a, a) = 1, so tr K = n),
"cosine" a.b / (||a|| ||b||) and "linear" a.b. Conditional scores use the joint kernel
Kx * Kt (Hadamard product, the Conditional-Vendi definition): H_q(X|T) = H_q(X,T) - H_q(T),
I_q(X;T) = H_q(X) + H_q(T) - H_q(X,T).

Public functions: `vendi_score`, `cond_vendi_score`, `vendi_entropies`, `vendi_modes`,
`pick_method`, `resolve_method` (the method and dim a score runs: `rkekernels score` uses it).
The argument checks and the method choice are in `rkekernels._methods`, the entropy of one
kernel matrix by each method in `rkekernels.ops.kernel_entropy` (its spectra from
`rkekernels.ops.spectra`); the inputs (validation, default bandwidth) in `rkekernels._bandwidth`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ._approx_error import refine_auto
from ._bandwidth import _pair
from ._input import to_output
from ._methods import (  # the constants stay importable from here, as before
    AUTO_EXACT_MAX_N,  # noqa: F401
    DEFAULT_DIM,
    DEFAULT_TOP_K,  # noqa: F401
    KERNELS,
    MAX_COV_WIDTH,  # noqa: F401
    METHODS,
    check_kernel,
    check_options,
    check_order,
    pick_method,
    reject_bandwidth,
)
from .ops.kernel_entropy import View, dot_part, entropy, gauss_u, top_modes
from .scores import RKEEntropies

__all__ = [
    "KERNELS",
    "METHODS",
    "Mode",
    "VendiEntropies",
    "check_order",
    "cond_vendi_score",
    "pick_method",
    "resolve_method",
    "vendi_entropies",
    "vendi_modes",
    "vendi_score",
]


class VendiEntropies(RKEEntropies):
    """Order-q Rényi kernel entropies, in nats: the order-q `RKEEntropies` (the same fields).

    Attributes:
        h_x: H_q(X), from the eigenvalues of Kx / tr(Kx)
        h_t: H_q(T), from Kt / tr(Kt)
        h_xt: H_q(X, T), from (Kx * Kt) / tr(Kx * Kt) (Hadamard product)
        h_x_given_t: H_q(X | T) = H_q(X, T) - H_q(T)
        mutual_info: I_q(X; T) = H_q(X) + H_q(T) - H_q(X, T)
    """

    __slots__ = ()


class Mode(NamedTuple):
    """One mode of a sample set: an eigenvector of K / tr(K) mapped back to the samples.

    Attributes:
        weight: its eigenvalue p_k (the share of the kernel's trace; the weights of all modes
            sum to 1, so a set of m equal, well separated clusters has m modes of weight 1/m).
        members: (m,) int64 indices of the samples assigned to this mode (each sample goes to
            the mode that explains the largest share p_k u_k[i]^2 of its k(x_i, x_i)), the
            most representative first.
        loadings: (m,) u_k[i]^2 of those members (the unit eigenvector's mass on each sample).
    """

    weight: float
    members: np.ndarray
    loadings: np.ndarray


# --------------------------------------------------------------------------- inputs and views


class _Inputs(NamedTuple):
    x: torch.Tensor
    t: torch.Tensor | None
    sigmas: list[float | None]
    many: bool
    sigma_t: float | None
    torch_out: bool
    backend: str


def _inputs(x: Any, t: Any, sigma: Any, sigma_t: Any, kernel: str, need_t: bool) -> _Inputs:
    kernel = check_kernel(kernel)
    if need_t and t is None:
        raise ValueError("t is None: conditional scores need prompt embeddings t of shape (n, m)")
    if kernel != "gaussian":
        reject_bandwidth(kernel, sigma=sigma, sigma_t=sigma_t)
        # bandwidths are unused here: pass placeholders so _pair only validates the data
        xt, tt, _, _, _, backend, torch_out = _pair(x, t, 1.0, 1.0, "auto")
        return _Inputs(xt, tt, [None], False, None, torch_out, backend)
    xt, tt, sigmas, many, st, backend, torch_out = _pair(x, t, sigma, sigma_t, "auto")
    return _Inputs(xt, tt, list(sigmas), many, st, torch_out, backend)


def _views(inp: _Inputs, kernel: str, sigma: float | None):
    """(view of X, view of T, joint view) for one bandwidth of x (T views None without t)."""
    if kernel == "gaussian":
        vx = View(kernel, ((inp.x, sigma),))
        if inp.t is None:
            return vx, None, None
        vt = View(kernel, ((inp.t, inp.sigma_t),))
        return vx, vt, View(kernel, ((inp.x, sigma), (inp.t, inp.sigma_t)))
    mx = dot_part(inp.x, kernel, "x")
    vx = View(kernel, (mx,))
    if inp.t is None:
        return vx, None, None
    mt = dot_part(inp.t, kernel, "t")
    return vx, View(kernel, (mt,)), View(kernel, (mx, mt))


def _prepare(x, t, q, sigma, sigma_t, kernel, method, dim, top_k, seed, need_t):
    q = check_order(q)
    inp = _inputs(x, t, sigma, sigma_t, kernel, need_t)
    method, dim = _resolve(inp, q, kernel, method, dim)
    return q, inp, method, check_options(method, inp.x.shape[0], dim, top_k, seed)


def _resolve(inp: _Inputs, q: float, kernel: str, method: str, dim: int | None):
    """(method, dim): `pick_method` by size, then (Gaussian "auto" past the exact budget, no
    dim given) `refine_auto` from the data. The one place method="auto" is resolved."""
    n = inp.x.shape[0]
    width = inp.x.shape[1] * (inp.t.shape[1] if inp.t is not None else 1)
    if kernel == "gaussian" and inp.t is not None:
        width = inp.x.shape[1] + inp.t.shape[1]
    asked = method
    method = pick_method(method, kernel=kernel, n=n, width=width, q=q)
    if asked == "auto" and method == "rff" and dim is None:
        method, dim = refine_auto(_probe_u(inp), q, DEFAULT_DIM["rff"])
    return method, dim


def resolve_method(
    x: Any,
    t: Any = None,
    q: float = 1.0,
    sigma: Any = None,
    sigma_t: Any = None,
    *,
    kernel: str = "gaussian",
    method: str = "auto",
    dim: int | None = None,
) -> tuple[str, int | None]:
    """The method (and feature dim) that `vendi_score` / `vendi_entropies` would run.

    The same resolution as the scores: `pick_method` from n, the width and q; then, for the
    Gaussian kernel past the exact budget (n > AUTO_EXACT_MAX_N, q != 2) with method="auto"
    and no ``dim``, `rkekernels._approx_error.refine_auto` chooses from the data (an estimate
    of Vendi_q at full n from the exact Vendi of 500 and 1,000 rows at the smallest sigma):
    ("rff", the smallest dim predicted within 5%) or ("exact", None). Passing the result
    back as ``method=..., dim=...`` runs that method without resolving (or probing) again.

    Args:
        x: (n, d) samples; t: (n, m) prompt embeddings or None (then the joint width counts).
        q, sigma, sigma_t, kernel, method, dim: as in `vendi_score` / `vendi_entropies`.

    Returns:
        (method, dim): dim is the rff dim chosen by the data, else the ``dim`` given (None: the
        method's default).

    Example:
        >>> import numpy as np
        >>> from rkekernels.vendi import resolve_method
        >>> x = np.random.default_rng(0).normal(size=(200, 4))
        >>> resolve_method(x, q=1.0, sigma=1.0), resolve_method(x, kernel="cosine")
        (('exact', None), ('covariance', None))
    """
    q = check_order(q)
    return _resolve(_inputs(x, t, sigma, sigma_t, kernel, False), q, kernel, method, dim)


def _probe_u(inp: _Inputs) -> torch.Tensor:
    """The flattest spectrum auto must get right: the joint view at the smallest sigma."""
    s = min(inp.sigmas)
    x, t = inp.x.detach(), None if inp.t is None else inp.t.detach()
    return gauss_u(((x, s),) if t is None else ((x, s), (t, inp.sigma_t)))


def _output(values: list[torch.Tensor], inp: _Inputs):
    return to_output(torch.stack(values).to(inp.x.dtype), inp.torch_out, inp.many)


# --------------------------------------------------------------------------- public functions


def vendi_score(
    x: Any,
    q: float = 1.0,
    sigma: Any = None,
    *,
    kernel: str = "gaussian",
    method: str = "auto",
    dim: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
):
    """Vendi score of order q: exp of the Rényi entropy of the eigenvalues of K / tr(K).

    Vendi_q(X) = exp(H_q),  H_q = log(sum_i p_i^q) / (1 - q),  H_1 = -sum_i p_i log p_i,
    H_inf = -log max_i p_i, where p = eig(K / tr K), K_ij = k(x_i, x_j). 1 <= Vendi_q <= n
    (at most d for the linear and cosine kernels); q = 2 with the Gaussian kernel is
    `rke_score`; order 1 is the score of vendi-score's ``score_K(K)`` for the same K.

    Methods (see the math page for when to use which):

    - "exact": eigenvalues of the dense n x n matrix in float64 (16 n^2 bytes peak:
      K and LAPACK's working copy; O(n^3) time).
      Gaussian q = 2 uses the streamed Frobenius sum of `rke_score` instead (no n x n matrix).
    - "covariance" (cosine, linear): the d x d covariance X^T X, O(n d^2) time, O(d^2) memory,
      exact at any n.
    - "rff" (gaussian): ``dim`` random Fourier features (default 4,096) from ``seed``; the
      D x D feature covariance, O(n d D + n D^2) time, O(D^2) memory. Biased low on flat
      spectra, about -1.5 V / (V + D) at q = 1 (-9% on digits at sigma 20, V = 310).
    - "nystrom" (gaussian): ``dim`` landmark rows (default 1,024) drawn with ``seed``; low by
      about -2 V_1 / (V_1 + dim). Both log their expected error (INFO, the error model and
      table in `rkekernels._approx_error` and docs/numerics.md).
    - "lanczos" (gaussian): the ``top_k`` largest eigenvalues (default 100) by ARPACK on a
      matrix-free, streamed kernel product; the remaining trace is spread evenly over the
      other n - top_k eigenvalues (exact for q = inf, an upper bound on H_q for the rest).
    - "auto": see `pick_method`; exact up to its time budget (n <= 6,408), past it an RFF
      dim whose predicted error is within 5% (from the exact Vendi of 1,000 rows), else
      exact; the choice and its expected error are logged.

    Args:
        x: (n, d) samples (torch tensor on any device, numpy array, ``__dlpack__`` array).
        q: order, > 0; 1 (von Neumann) and ``math.inf`` included.
        sigma: Gaussian bandwidth (float, a sequence for a 1-D result, or None for the
            library's default bandwidth); must be None for "cosine" and "linear".
        kernel: "gaussian" exp(-||a - b||^2 / (2 sigma^2)), "cosine" or "linear".
        method: "auto", "exact", "covariance", "rff", "nystrom" or "lanczos".
        dim: feature dimension (rff, even) or number of landmarks (nystrom).
        top_k: number of eigenvalues for "lanczos".
        seed: random draws of rff and nystrom.

    Returns:
        torch input: a 0-dim tensor (1-D for several sigmas) with autograd (not for lanczos).
        other input: a float (numpy array for several sigmas).

    Raises:
        ValueError: q <= 0 or NaN, unknown kernel or method, a method that does not fit the
            kernel, sigma with cosine/linear, and the bad inputs of `rke_score`.

    Example:
        >>> import math, torch, rkekernels
        >>> centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
        >>> x = centres.repeat_interleave(40, dim=0) + 0.01 * torch.randn(120, 2)
        >>> round(float(rkekernels.vendi_score(x, sigma=1.0)), 3)  # three modes
        3.0
        >>> round(float(rkekernels.vendi_score(x, math.inf, sigma=1.0)), 3)
        3.0
        >>> round(rkekernels.vendi_score([[1.0, 0.0], [0.0, 2.0]], kernel="cosine"), 3)
        2.0
    """
    q, inp, method, opts = _prepare(
        x, None, q, sigma, None, kernel, method, dim, top_k, seed, False
    )
    vals = [
        entropy(_views(inp, kernel, s)[0], q, method, opts, inp.backend).exp() for s in inp.sigmas
    ]
    return _output(vals, inp)


def vendi_entropies(
    x: Any,
    t: Any,
    q: float = 1.0,
    sigma: Any = None,
    sigma_t: Any = None,
    *,
    kernel: str = "gaussian",
    method: str = "auto",
    dim: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
) -> VendiEntropies:
    """Order-q entropy decomposition of samples x and prompts t, in nats (Conditional-Vendi).

    H_q(X), H_q(T) and H_q(X, T) are the order-q entropies (see `vendi_score`) of Kx / tr Kx,
    Kt / tr Kt and (Kx * Kt) / tr(Kx * Kt) (Hadamard product); H_q(X|T) = H_q(X,T) - H_q(T),
    I_q(X;T) = H_q(X) + H_q(T) - H_q(X,T). q = 2 with the Gaussian kernel is `rke_entropies`.
    For the Gaussian kernel the joint kernel is the unit Gaussian of [x / sigma, t / sigma_t],
    so every method applies to it unchanged; for cosine/linear it is the linear kernel of the
    row-wise Kronecker product x_i kron t_i (covariance width d * m).

    Args:
        x: (n, d) samples. t: (n, m) prompt embeddings, one per sample.
        q, sigma, kernel, method, dim, top_k, seed: as in `vendi_score` (the same method and
            random draws for all three spectra). sigma_t: bandwidth of t (None: the default).

    Returns:
        VendiEntropies(h_x, h_t, h_xt, h_x_given_t, mutual_info): tensors (with autograd) for
        torch input, 1-D over several sigmas (h_t repeated); floats otherwise.

    Example:
        >>> import torch, rkekernels
        >>> x = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
        >>> t = torch.tensor([[0.0], [0.0], [50.0], [50.0]])
        >>> e = rkekernels.vendi_entropies(x, t, 1.0, sigma=1.0, sigma_t=1.0)
        >>> [round(float(v), 4) for v in e]  # log 4, log 2, log 4, log 2, log 2
        [1.3863, 0.6931, 1.3863, 0.6931, 0.6931]
    """
    q, inp, method, opts = _prepare(x, t, q, sigma, sigma_t, kernel, method, dim, top_k, seed, True)
    cols: list[list[torch.Tensor]] = [[] for _ in range(5)]
    for h_x, h_t, h_xt in _joint_entropies(inp, kernel, q, method, opts, with_x=True):
        for col, v in zip(cols, (h_x, h_t, h_xt, h_xt - h_t, h_x + h_t - h_xt)):
            col.append(v)
    return VendiEntropies(*(_output(c, inp) for c in cols))


def _joint_entropies(inp: _Inputs, kernel: str, q: float, method: str, opts: dict, with_x: bool):
    """(H_q(X) or None, H_q(T), H_q(X, T)) for each bandwidth of ``inp``, in that order of
    computation; H_q(T) (one sigma_t) is computed once."""
    h_t = None
    for s in inp.sigmas:
        vx, vt, vxt = _views(inp, kernel, s)
        if h_t is None:
            h_t = entropy(vt, q, method, opts, inp.backend)
        h_x = entropy(vx, q, method, opts, inp.backend) if with_x else None
        yield h_x, h_t, entropy(vxt, q, method, opts, inp.backend)


def cond_vendi_score(
    x: Any,
    t: Any,
    q: float = 1.0,
    sigma: Any = None,
    sigma_t: Any = None,
    *,
    kernel: str = "gaussian",
    method: str = "auto",
    dim: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
):
    """Conditional Vendi score of samples given prompts: exp(H_q(X, T) - H_q(T)).

    The joint kernel is Kx * Kt (Hadamard product). Identical prompts give `vendi_score` (x);
    prompts all far apart give 1; q = 2 with the Gaussian kernel is `cond_rke_score`.

    Args:
        x: (n, d) samples. t: (n, m) prompt embeddings.
        q, sigma, sigma_t, kernel, method, dim, top_k, seed: as in `vendi_entropies`.

    Returns:
        As `vendi_score`.

    Example:
        >>> import torch, rkekernels
        >>> x = torch.tensor([[0.0], [100.0], [200.0], [300.0]])
        >>> t = torch.tensor([[0.0], [0.0], [50.0], [50.0]])
        >>> round(float(rkekernels.cond_vendi_score(x, t, 1.0, sigma=1.0, sigma_t=1.0)), 6)
        2.0
    """
    q, inp, method, opts = _prepare(x, t, q, sigma, sigma_t, kernel, method, dim, top_k, seed, True)
    joint = _joint_entropies(inp, kernel, q, method, opts, with_x=False)
    return _output([(h_xt - h_t).exp() for _, h_t, h_xt in joint], inp)


def vendi_modes(
    x: Any,
    k: int = 5,
    sigma: Any = None,
    *,
    kernel: str = "gaussian",
    method: str = "auto",
    dim: int | None = None,
    top_k: int | None = None,
    seed: int = 0,
) -> list[Mode]:
    """The k largest modes of a sample set: top eigenvectors of K / tr(K) mapped to samples.

    K / tr(K) = sum_j p_j u_j u_j^T with unit eigenvectors u_j (n,). Mode j has weight p_j; its
    loading on sample i is u_j[i]^2 (summing to 1 over the samples). Sample i is assigned to
    the mode among the top k with the largest share p_j u_j[i]^2 of k(x_i, x_i). Feature
    methods (covariance, rff, nystrom) recover u_j = Phi v_j / sqrt(lambda_j) from the
    covariance's eigenvectors v_j in a second streamed pass (the FKEA construction); lanczos
    returns its eigenvectors. Memory as for `vendi_score` plus (n, k).

    Args:
        x: (n, d) samples. k: number of modes (at most n; at most top_k for lanczos).
        sigma, kernel, method, dim, top_k, seed: as in `vendi_score` (one sigma).

    Returns:
        list of `Mode` (weight, members, loadings), largest weight first (numpy arrays).

    Example:
        >>> import torch, rkekernels
        >>> x = torch.cat([torch.zeros(6, 2), torch.full((3, 2), 50.0)])  # 6 + 3 duplicates
        >>> modes = rkekernels.vendi_modes(x, 2, sigma=1.0)
        >>> [round(m.weight, 3) for m in modes], [sorted(m.members.tolist()) for m in modes]
        ([0.667, 0.333], [[0, 1, 2, 3, 4, 5], [6, 7, 8]])
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int (number of modes), got {k!r}")
    if isinstance(sigma, list | tuple):
        raise ValueError("sigma must be a single bandwidth for vendi_modes")
    _, inp, method, opts = _prepare(
        x, None, 1.0, sigma, None, kernel, method, dim, top_k, seed, False
    )
    view = _views(inp, kernel, inp.sigmas[0])[0]
    with torch.no_grad():
        p, u = top_modes(view, int(k), method, opts)
    return _modes_of(p, u)


def _modes_of(p: torch.Tensor, u: torch.Tensor) -> list[Mode]:
    """`Mode`s from the top eigenvalues p (k,) of K / tr(K) and unit eigenvectors u (n, k).

    Sample i goes to the mode j with the largest share p_j u_j[i]^2; each mode lists its samples
    by loading u_j[i]^2, largest first (the assignment of `vendi_modes`, which calls this;
    `rkekernels.evaluation.ranks` gives it eigenvectors gathered from several ranks).
    """
    p, u = p.cpu().numpy(), u.cpu().numpy()
    share = p[None, :] * u**2
    owner = share.argmax(1)
    out = []
    for j in range(len(p)):
        idx = np.flatnonzero(owner == j)
        load = u[idx, j] ** 2
        order = np.argsort(-load, kind="stable")
        out.append(Mode(float(p[j]), idx[order].astype(np.int64), load[order]))
    return out
