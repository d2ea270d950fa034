"""The order-q entropy of one kernel matrix, by method, and its top modes (`rkekernels.vendi`).

A `View` names one kernel matrix: the Gaussian kernel of (tensor, bandwidth) pairs (their
Hadamard product: the unit Gaussian of [x / sigma, t / sigma_t]), or a dot-product kernel of
(tensor, row scale) pairs (cosine: the scale 1 / ||x_i||; linear: None). `entropy` takes its
order-q entropy by the method already chosen (`rkekernels._methods.pick_method`); `top_modes`
its top eigenpairs. The spectra themselves come from `rkekernels.ops.spectra`.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from .. import _approx_error
from . import lapack, spectra
from .pair_sums import pair_sums

__all__ = ["View", "dot_part", "entropy", "top_modes"]


def dot_part(m: torch.Tensor, kernel: str, name: str) -> tuple:
    """(matrix, row scale): 1 / ||x_i|| for cosine (applied per block), None for linear."""
    nrm = m.norm(dim=1, keepdim=True)
    if kernel == "cosine":
        if not bool((nrm > 0).all()):
            bad = int((nrm == 0).sum())
            raise ValueError(
                f"{name} has {bad} all-zero rows: the cosine kernel is undefined for them"
            )
        return m, 1.0 / nrm
    if not bool((nrm > 0).any()):
        raise ValueError(f"{name} is all zeros: the linear kernel matrix has trace 0")
    return m, None


class View(NamedTuple):
    """One kernel matrix to take the spectrum of: gaussian of (tensor, sigma) pairs, or dot."""

    kernel: str
    parts: tuple  # gaussian: ((x, sigma), ...); dot: ((x, row scale or None), ...)


def gauss_u(parts: tuple) -> torch.Tensor:
    """u = [(x - mean)/sigma, ...]: the joint Gaussian kernel is the unit kernel of u.

    One part (the common case) makes one copy of x, divided in place (not three: the
    difference, the quotient and the concatenation)."""
    if len(parts) == 1:
        m, s = parts[0]
        return (m - m.mean(0, keepdim=True)).div_(s)
    return torch.cat([(m - m.mean(0, keepdim=True)) / s for m, s in parts], dim=1)


def width_of(view: View) -> int:
    if view.kernel == "gaussian":
        return sum(m.shape[1] for m, _ in view.parts)
    return math.prod(m.shape[1] for m, _ in view.parts)


def dot_gram(parts: tuple) -> torch.Tensor:
    k = None
    for m, scale in parts:
        md = m.to(torch.float64) if scale is None else m.to(torch.float64) * scale
        g = md @ md.T
        k = g if k is None else k * g
    return k


def feature_cov(view: View, method: str, opts: dict, gram_ok: bool = True) -> torch.Tensor:
    """Phi^T Phi, or (``gram_ok`` and n < width) Phi Phi^T: the same nonzero spectrum."""
    if view.kernel != "gaussian":
        src = view.parts[0][0]
        fmap, width, dtype = spectra.dot_features(view.parts), width_of(view), src.dtype
    else:
        src = gauss_u(view.parts)
        if method == "rff":
            fmap, width = spectra.rff_map(src, opts["dim"], opts["seed"]), opts["dim"]
            dtype = src.dtype
        else:
            fmap, width = spectra.nystrom_map(src, opts["dim"], opts["seed"])
            dtype = torch.float64
    n = src.shape[0]
    if gram_ok and n < width:
        phi = fmap(0, n).to(torch.float64)
        return phi @ phi.T
    return spectra.covariance(fmap, n, width, src.device, dtype)


def entropy(view: View, q: float, method: str, opts: dict, backend: str) -> torch.Tensor:
    """H_q of one view's kernel matrix, float64 0-dim tensor (autograd except for lanczos)."""
    if method == "exact" and view.kernel == "gaussian" and q == 2.0:
        # the streamed Frobenius sum of rke_score / cond_rke_score: any n, no n x n matrix
        (x, s), *rest = view.parts
        t, st = rest[0] if rest else (None, None)
        fx, _, fxt = pair_sums(x, t, [s], st, want_fx=t is None, backend=backend)
        n = x.shape[0]
        return 2.0 * math.log(n) - torch.log((fx if t is None else fxt)[0])
    if method == "exact":
        if view.kernel == "gaussian":
            k = spectra.gaussian_gram(gauss_u(view.parts))
        else:
            k = dot_gram(view.parts)
        if q == 2.0:
            return 2.0 * torch.log(torch.trace(k)) - torch.log((k * k).sum())
        return spectra.renyi_entropy(lapack.eigvalsh(k) / torch.trace(k), q)
    if method == "lanczos":
        u = gauss_u(view.parts)
        n = u.shape[0]
        vals, _ = spectra.lanczos_top(u, opts["top_k"])
        p = torch.as_tensor(vals.copy(), dtype=torch.float64, device=u.device) / n
        return spectra.renyi_entropy(p, q, (1.0 - p.sum()).clamp(min=0.0), n - len(vals))
    cov = feature_cov(view, method, opts)
    p = None
    if q == 2.0:
        h = spectra.order2_entropy_from_cov(cov)
    else:
        p = spectra.spectrum_of_cov(cov)
        h = spectra.renyi_entropy(p, q)
    if view.kernel == "gaussian" and _approx_error.logger.isEnabledFor(logging.INFO):
        if method == "nystrom" and p is None:
            p = spectra.spectrum_of_cov(cov.detach())
        n = view.parts[0][0].shape[0]
        _approx_error.log_expected(method, q, p, h, opts["dim"], n)
    return h


def top_modes(view: View, k: int, method: str, opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k eigenvalues of K / tr K (k,), unit eigenvectors (n, k)), float64."""
    n = view.parts[0][0].shape[0]
    k = min(k, n)
    if method == "exact":
        if view.kernel == "gaussian":
            kmat = spectra.gaussian_gram(gauss_u(view.parts))
        else:
            kmat = dot_gram(view.parts)
        w, v = lapack.eigh(kmat)
        tr = torch.trace(kmat)
        return w.flip(0)[:k] / tr, v.flip(1)[:, :k]
    if method == "lanczos":
        u = gauss_u(view.parts)
        if k > opts["top_k"]:
            raise ValueError(f"k = {k} modes need top_k >= k for method='lanczos'")
        vals, vecs = spectra.lanczos_top(u, opts["top_k"], vectors=True)
        p = torch.as_tensor(vals[:k].copy(), dtype=torch.float64) / n
        return p, torch.as_tensor(vecs[:, :k].copy(), dtype=torch.float64)
    cov = feature_cov(view, method, opts, gram_ok=False)
    w, v = lapack.eigh(cov)
    k = min(k, len(w))
    w, v = w.flip(0)[:k], v.flip(1)[:, :k]
    if view.kernel == "gaussian":
        u = gauss_u(view.parts)
        fmap = (
            spectra.rff_map(u, opts["dim"], opts["seed"])
            if method == "rff"
            else spectra.nystrom_map(u, opts["dim"], opts["seed"])[0]
        )
    else:
        fmap = spectra.dot_features(view.parts)
    scale = 1.0 / w.clamp(min=torch.finfo(torch.float64).tiny).sqrt()
    blocks = spectra.row_blocks(n, cov.shape[0])
    vecs = torch.cat([(fmap(i0, i1).to(torch.float64) @ v) * scale for i0, i1 in blocks])
    return w / torch.trace(cov), vecs
