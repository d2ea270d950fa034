"""The eigen outputs of `rkekernels evaluate` over several ranks: Vendi, the modes and KEN.

The random-feature ("rff") paths split over the ranks of `rkekernels.evaluation.ranks` (its
process group, gathers and broadcasts); the exact paths run on rank 0 (`ranks.on_root`). With
phi the ``dim`` random Fourier features of the centred, scaled rows (one seed: the same features
on every rank, nothing moves)::

    C = sum_r sum_{i in rank r's rows} phi(u_i) phi(u_i)^T     (D x D, float64, one all-reduce)
    Vendi_q = exp(H_q(eig(C / tr C)))
    modes:  (lambda_j, v_j) = top eigenpairs of C (rank 0, broadcast);
            loadings u_j[i] = phi(u_i) . v_j / sqrt(lambda_j): each rank its rows, an (n, k)
            all-gather, then `rkekernels.vendi._modes_of` as one process
    KEN:    eig(C_x / n - eta C_Y / m') on rank 0, broadcast; the novel modes as the modes;
            the null's draw j on rank j % P, the n_draws values all-reduced

Each function has the signature of the one-process function it wraps and is that function
without a process group (or with one rank). x (and y): the whole set on every rank, as
`rkekernels.evaluation.evaluate` holds it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import vendi
from .._input import to_output
from .._methods import check_order
from ..ops import lapack, spectra
from .novelty import Novelty, _check_counts, _ken_of, _novelty
from .novelty import ken_novelty as _ken_one
from .ranks import _bounds, _broadcast, _gather, _reduce, active, on_root, world
from .statistics import _two_sets

__all__ = ["ken_novelty", "vendi_modes", "vendi_score"]


# --------------------------------------------------------------------------- rff spectra


def _rff_cov(fmap, lo: int, hi: int, width: int, dtype: torch.dtype, dev) -> torch.Tensor:
    """sum_{lo <= i < hi} phi_i phi_i^T (width x width, float64), streamed in row blocks."""
    if hi <= lo:
        return torch.zeros(width, width, dtype=torch.float64, device=dev)
    return spectra.covariance(lambda i0, i1: fmap(lo + i0, lo + i1), hi - lo, width, dev, dtype)


def _loadings(fmap, lo: int, hi: int, vecs: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
    """(phi_i . v_j) * scale_j for lo <= i < hi, float64 (hi - lo, k), all ranks' gathered."""
    rows = [
        (fmap(lo + i0, lo + i1).to(torch.float64) @ vecs) * scale
        for i0, i1 in spectra.row_blocks(hi - lo, vecs.shape[0])
    ]
    return _gather(torch.cat(rows) if rows else None)


def _eigh_on_root(mat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, all) and the top-k eigenvectors of the symmetric ``mat``,
    computed on rank 0 and broadcast (every rank maps its samples with the same vectors)."""
    n = mat.shape[0]
    out = torch.zeros(n, 1 + k, dtype=torch.float64, device=mat.device)
    if world()[0] == 0:
        w, v = lapack.eigh(mat)
        out[:, 0], out[:, 1:] = w.flip(0), v.flip(1)[:, :k]
    out = _broadcast(out)
    return out[:, 0], out[:, 1:]


def vendi_score(x: Any, q: float = 1.0, sigma: Any = None, *, method: str = "auto", **kw: Any):
    """`rkekernels.vendi_score` for evaluate: "rff" with the covariance summed over the ranks.

    For each bandwidth s: u = (x - mean) / s, C = sum_r sum_{i in rank r's rows} phi(u_i)
    phi(u_i)^T (the same ``dim`` random Fourier features from ``seed`` on every rank), one
    all-reduce of K D^2 float64; Vendi_q = exp(H_q(eig(C / tr C))) as one process. Other
    methods run on rank 0 (`on_root`). x: the whole (n, d) tensor on every rank.

    Example:
        >>> import torch
        >>> from rkekernels.evaluation import ranks_spectra as ranks
        >>> x = torch.tensor([[0.0], [100.0], [200.0]])
        >>> round(float(ranks.vendi_score(x, 1.0, 1.0, method="exact")), 6)
        3.0
    """
    if not active():
        return vendi.vendi_score(x, q, sigma, method=method, **kw)
    if method != "rff":
        res = on_root(lambda: _cpu(vendi.vendi_score(x, q, sigma, method=method, **kw)))
        return res.to(x.device) if isinstance(res, torch.Tensor) else res
    q = check_order(q)
    many = isinstance(sigma, list | tuple)
    dim, seed = kw.get("dim") or vendi.DEFAULT_DIM["rff"], int(kw.get("seed", 0))
    xd = x.detach()
    lo, hi = _bounds(xd.shape[0], *world())
    covs = []
    for s in list(sigma) if many else [sigma]:
        u = (xd - xd.mean(0, keepdim=True)) / s
        fmap = spectra.rff_map(u, dim, seed)
        covs.append(_rff_cov(fmap, lo, hi, 2 * (dim // 2), u.dtype, u.device))
    covs = _reduce(torch.stack(covs))
    vals = torch.stack([_entropy(c, q).exp() for c in covs]).to(xd.dtype)
    return to_output(vals, True, many)


def _entropy(cov: torch.Tensor, q: float) -> torch.Tensor:
    """H_q of the spectrum of C / tr C, as `rkekernels.ops.kernel_entropy.entropy` takes it."""
    if q == 2.0:
        return spectra.order2_entropy_from_cov(cov)
    return spectra.renyi_entropy(spectra.spectrum_of_cov(cov), q)


def vendi_modes(x: Any, k: int = 5, sigma: Any = None, *, method: str = "auto", **kw: Any):
    """`rkekernels.vendi_modes` for evaluate: "rff" from the all-reduced covariance.

    C (D x D) as in `vendi_score`; its top-k eigenpairs (lambda_j, v_j) on rank 0, broadcast;
    each rank maps its rows, u_j[i] = phi(u_i) . v_j / sqrt(lambda_j), and the (n, k) loadings
    are all-gathered: the members of each mode as one process assigns them
    (`rkekernels.vendi._modes_of`). Other methods run on rank 0.

    Example:
        >>> import torch
        >>> from rkekernels.evaluation import ranks_spectra as ranks
        >>> x = torch.cat([torch.zeros(6, 2), torch.full((3, 2), 50.0)])
        >>> [round(m.weight, 3) for m in ranks.vendi_modes(x, 2, 1.0, method="exact")]
        [0.667, 0.333]
    """
    if not active():
        return vendi.vendi_modes(x, k, sigma, method=method, **kw)
    if method != "rff":
        return on_root(vendi.vendi_modes, x, k, sigma, method=method, **kw)
    dim, seed = kw.get("dim") or vendi.DEFAULT_DIM["rff"], int(kw.get("seed", 0))
    xd = x.detach()
    n = xd.shape[0]
    lo, hi = _bounds(n, *world())
    u = (xd - xd.mean(0, keepdim=True)) / sigma
    fmap = spectra.rff_map(u, dim, seed)
    width = 2 * (dim // 2)
    cov = _reduce(_rff_cov(fmap, lo, hi, width, u.dtype, u.device))
    k = min(int(k), n, width)
    w, v = _eigh_on_root(cov, k)
    w = w[:k]
    scale = 1.0 / w.clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    vecs = _loadings(fmap, lo, hi, v, scale)
    return vendi._modes_of(w / torch.trace(cov), vecs)


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


# --------------------------------------------------------------------------- KEN novelty


def ken_novelty(x: Any, y: Any, sigma: Any = None, *, method: str = "auto", **kw: Any) -> Novelty:
    """`rkekernels.evaluation.ken_novelty` for evaluate: "rff" split over the ranks.

    With phi the ``dim`` random Fourier features of the centred (x, y) / sigma (the same on
    every rank), KEN's matrix is C_x / n - eta C_Y / m', C_x = sum_i phi(x_i) phi(x_i)^T and
    C_Y over the reference rows it is computed against (all m; with the null the seeded subset
    of m' = m - n rows of one process): the covariances are summed over the ranks' blocks (one
    all-reduce), the eigenpairs taken on rank 0 and broadcast, the modes' loadings all-gathered.
    The null's draws j (reference subsets of n rows against the rest, at the same sigma) run on
    rank j % P from the rotated reference features (each rank computes them, none move), their
    KEN values all-reduced; p and the null's moments as one process. Other methods: rank 0.

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import ranks_spectra as ranks
        >>> ref = np.array([[0.0], [0.0], [100.0], [100.0]])
        >>> round(ranks.ken_novelty(ref, ref, 1.0, method="exact").score, 6)
        0.0
    """
    if not active():
        return _ken_one(x, y, sigma, method=method, **kw)
    if method != "rff":
        return on_root(_ken_one, x, y, sigma, method=method, **kw)
    top, per_mode = kw.get("top", 8), kw.get("per_mode", 16)
    draws, seed, eta = kw.get("null_draws", 0), int(kw.get("seed", 0)), float(kw.get("eta", 1.0))
    dim = kw.get("dim", 4096)
    _check_counts(top, per_mode, draws)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (random features); got {dim!r}")
    xt, yt, sigmas, _, _ = _two_sets(x, y, sigma)
    n, m = xt.shape[0], yt.shape[0]
    if draws and m < 2 * n:
        raise ValueError(f"null_draws={draws} needs a reference of at least {2 * n} rows; got {m}")
    both = torch.cat([xt, yt]).detach().double()
    u = (both - both.mean(0, keepdim=True)) / sigmas[0]
    return _ken_rff(u, n, dim, eta, top, per_mode, draws, seed)


def _ken_rff(u, n, dim, eta, top, per_mode, draws, seed) -> Novelty:
    """KEN (and its null) from the scaled, centred rows u = [x; y] (see `ken_novelty`)."""
    rank, size = world()
    m, dev, width = u.shape[0] - n, u.device, 2 * (dim // 2)
    fmap = spectra.rff_map(u, dim, seed)
    k = m - n if draws else m
    gen = torch.Generator().manual_seed(seed)
    lo, hi = _bounds(n, rank, size)
    ylo, yhi = _bounds(m, rank, size)
    covs = [_rff_cov(fmap, lo, hi, width, torch.float64, dev)]
    covs.append(_rff_cov(fmap, n + ylo, n + yhi, width, torch.float64, dev))  # all of Y
    if draws:  # KEN against the seeded subset of k reference rows, the null's size
        sub = torch.randperm(m, generator=gen)[:k]
        slo, shi = _bounds(k, rank, size)
        fsub = spectra.rff_map(u[n + sub[slo:shi].to(dev)], dim, seed)  # the same draws of W
        covs.append(_rff_cov(fsub, 0, shi - slo, width, torch.float64, dev))
    covs = _reduce(torch.stack(covs))
    top_k = min(top, width)
    vals, w = _eigh_on_root(covs[0] / n - eta * covs[-1] / k, top_k)
    obs = _novelty(vals, _loadings(fmap, lo, hi, w), n, top, per_mode)
    if not draws:
        return obs
    lam, rot = lapack.eigh(covs[1])  # the same matrix on every rank
    fy = fmap(n, n + m).to(torch.float64) @ rot  # now fy^T fy = diag(lam)
    null = torch.zeros(draws, dtype=torch.float64, device=dev)
    for j in range(draws):  # every rank draws every subset: the generator stays in step
        pick = torch.randperm(m, generator=gen)[:n].to(dev)
        if j % size != rank:
            continue
        a = fy[pick]
        mat = (a.T @ a).mul_(1.0 / n + eta / k)
        mat.diagonal().sub_(lam * (eta / k))
        null[j] = _ken_of(lapack.eigvalsh(mat))[0]
    vals_null = _reduce(null).cpu().numpy()
    p = (1 + int((vals_null >= obs.score).sum())) / (1 + draws)
    std = float(np.std(vals_null, ddof=1)) if draws > 1 else 0.0
    return obs._replace(null_mean=float(vals_null.mean()), null_std=std, p_value=p)
