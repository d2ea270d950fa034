"""Guidance beyond the Gaussian RKE objective: algorithm="vendi", and the cosine/linear kernels.

RKE with kernel="cosine" or "linear" (algorithm="rke"): S(z) = sum_j w_j k(phi, f_j)^2 with
k(a, b) = a.b (cosine: on unit rows), w_j = k_sc(y, c_j)^2 as for the Gaussian kernel, so
-d log S / d psi = -2 sum_j w_j (psi.f_j) f_j / S: two GEMMs over the bank, O(n D)
(`dot_rke_guide`).

Vendi (algorithm="vendi"): the first-order gain in the order-1 entropy of bank + sample.

A feature map psi with k(a, b) = psi(a).psi(b) (exactly for "cosine"/"linear", by random Fourier
features for "gaussian", with the conditional joint kernel k_s(phi, f) k_sc(y, c) the unit
Gaussian of [phi / s, y / s_c]) turns the bank into C = sum_j psi_j psi_j^T (D x D), whose
eigenvalues over T = tr C + ||psi||^2 are the spectrum of the bank's kernel matrix. Adding the
sample changes C by psi psi^T; the von Neumann entropy H = -tr(rho log rho), rho = C / T, then
changes by (first order, trace included)::

    dH = -(1 / T) d(psi^T (log rho + H I) psi)

so maximising the Vendi score of bank + sample means minimising

    log S(z) = psi^T (L + H I) psi,   L = log((C + eps I) / T),   eps = ||psi||^2 / 2

with H the entropy of the bank's spectrum and ||psi||^2 = k(z, z) the sample's own (1 for the
random features and cosine; with the linear kernel it moves with z, and so do T and eps).
(eps: the derivative taken at the midpoint of the sample's own rank-one step, finite in the
directions the bank does not span). The guidance is -d log S / dz (through T and eps too),
chained through psi and the feature map. The eigendecomposition of C (or of the n x n feature
Gram when n < D) is done once per bank change and cached; each step costs O(b (d D + D r)) for
r = min(n, D) eigenvectors. With ``include_batch`` (b > 1) the current samples join C as
constants, each one's own psi included (one D x D eigendecomposition per step, independent of
n). Order 1 is the Vendi of vendi-score; the official SPARKE code's "vendi"
algorithm takes a full SVD of the (n + 1) x (n + 1) kernel matrix at every step instead.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import lapack
from .guidance_common import Problem

__all__ = ["ALGORITHMS", "DEFAULT_DIM", "KERNELS", "check", "dot_rke_guide", "guide", "vendi_guide"]

KERNELS = ("gaussian", "cosine", "linear")
ALGORITHMS = ("rke", "vendi")
#: random Fourier features for the Gaussian kernel (D)
DEFAULT_DIM = 1024

_CACHE: dict = {}


class _Map(NamedTuple):
    kernel: str
    w: torch.Tensor | None  # (d + m, D/2) RFF frequencies of u = [phi / s, y / s_c]
    inv_s: float
    inv_c: float

    def __call__(self, phi: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.kernel == "linear":
            return phi
        if self.kernel == "cosine":
            return phi / phi.norm(dim=1, keepdim=True)
        p = self._proj(phi, y)
        return torch.cat([p.cos(), p.sin()], 1) / math.sqrt(self.w.shape[1])

    def _proj(self, phi, y):
        u = phi * self.inv_s
        if y is not None:
            u = torch.cat([u, y * self.inv_c], 1)
        return u @ self.w

    def vjp(self, phi: torch.Tensor, y: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
        """d(psi . g) / d phi for each row."""
        if self.kernel == "linear":
            return g
        if self.kernel == "cosine":
            nrm = phi.norm(dim=1, keepdim=True)
            u = phi / nrm
            return (g - u * (u * g).sum(1, keepdim=True)) / nrm
        p = self._proj(phi, y)
        h = self.w.shape[1]
        gp = (p.cos() * g[:, h:] - p.sin() * g[:, :h]) / math.sqrt(h)
        return (gp @ self.w[: phi.shape[1]].T) * self.inv_s


def check(algorithm, kernel) -> None:
    """ValueError naming ``algorithm`` or ``kernel`` when either is unknown."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def guide(p: Problem, algorithm: str, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The path of `rkekernels.ops.guidance.guide` for algorithm="vendi" or a dot kernel.

    Returns (-d log S / dz (b, D), log S (b,)) in the compute dtype of the `Problem` ``p``.
    """
    check(algorithm, kernel)
    cdt = p.compute_dtype
    zc = p.z.to(cdt)
    yc = p.y.to(cdt) if p.y is not None else None
    if algorithm == "vendi":
        return vendi_guide(p, zc, yc, kernel=kernel)
    return dot_rke_guide(p, zc, yc, kernel=kernel)


def _feature_map(kernel, d, m, inv_s, inv_c, dim, seed, device, dtype) -> _Map:
    if kernel != "gaussian":
        return _Map(kernel, None, inv_s, inv_c)
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.randn(d + m, dim // 2, generator=gen, dtype=torch.float64)
    return _Map(kernel, w.to(device=device, dtype=dtype), inv_s, inv_c)


def _blocks(n: int, width: int):
    rows = max(256, 2**22 // max(1, width))
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def _bank_psi(fmap: _Map, fb: torch.Tensor, bc: torch.Tensor | None, cdt) -> list:
    return [
        fmap(fb[i0:i1].to(cdt), bc[i0:i1].to(cdt) if bc is not None else None)
        for i0, i1 in _blocks(fb.shape[0], fb.shape[1])
    ]


def _bank_moment(fmap: _Map, fb, bc, cdt, width: int):
    """(C (D x D) float64, None) when n >= D, else (None, Psi (n, D)) for the Gram route."""
    n = fb.shape[0]
    if n >= width:
        cov = torch.zeros(width, width, dtype=torch.float64, device=fb.device)
        for psi in _bank_psi(fmap, fb, bc, cdt):
            cov += (psi.T @ psi).to(torch.float64)
        return cov, None
    parts = _bank_psi(fmap, fb, bc, cdt)
    return None, (torch.cat(parts).to(torch.float64) if parts else None)


def _spectrum(cov, psi_rows):
    """(eigenvalues (r,), orthonormal eigenvectors (D, r)) of C = Psi^T Psi, float64."""
    if cov is not None:
        return lapack.eigh(cov)
    lam, u = lapack.eigh(psi_rows @ psi_rows.T)
    keep = lam > lam.max() * 1e-12
    lam, u = lam[keep], u[:, keep]
    return lam, (psi_rows.T @ u) / lam.sqrt()


def _key(fb, bc, parts) -> tuple:
    """The cache key of one state of a bank: it changes with every write to the bank.

    A torch tensor's version counter (shared by its views and ``detach``) moves on every
    in-place write; with the address, shape, strides, dtype and device it names one state of one
    bank (the cache holds the bank itself, so no other tensor can take that address meanwhile).
    Memory torch does not own (numpy, DLPack) is written without the counter: see `_same_bank`.
    """

    def sig(t):
        if t is None or t.numel() == 0:
            return None
        return (tuple(t.shape), t.stride(), t.dtype, str(t.device), t.data_ptr(), t._version)

    return (sig(fb), sig(bc), *parts)


def _foreign(t) -> bool:
    """Memory torch did not allocate (numpy, DLPack): writes there leave ``_version`` alone."""
    return t is not None and t.numel() > 0 and not t.untyped_storage().resizable()


def _kept(fb, bc) -> tuple:
    """What the cache holds of the bank: the tensors, or copies of memory torch does not own."""
    return tuple(t.clone() if _foreign(t) else t for t in (fb, bc))


def _same_bank(cached, key, fb, bc) -> bool:
    """The cached decomposition belongs to this bank (foreign memory: compared whole)."""
    if cached is None or cached[0] != key:
        return False
    return all(
        torch.equal(t, kept) for t, kept in zip((fb, bc), cached[4], strict=True) if _foreign(t)
    )


def vendi_guide(
    p: Problem,
    zc: torch.Tensor,
    yc: torch.Tensor | None,
    *,
    kernel: str = "gaussian",
    dim: int = DEFAULT_DIM,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-d log S / dz (b, D), log S (b,)) for the latents ``zc`` = ``p.z`` in the compute dtype.

    The bank ``p.bank`` (n, D) and its prompt embeddings ``p.bank_cond`` (n, m) or None; ``yc``
    the current prompt embeddings in the compute dtype (conditional exactly when given, as for
    algorithm="rke").
    """
    fb, bc, normalize, batch = p.bank, p.bank_cond, p.normalize, p.batch
    sigma, sigma_cond = p.sigma, p.sigma_cond
    b, d = zc.shape
    cdt = zc.dtype
    if yc is not None and kernel != "gaussian":
        raise ValueError(
            f"algorithm='vendi' with prompt embeddings needs kernel='gaussian' (the joint kernel "
            f"is one Gaussian of [phi / sigma, y / sigma_cond]); got kernel={kernel!r}"
        )
    znorm = zc.norm(dim=1, keepdim=True) if normalize else None
    phi = zc / znorm if normalize else zc
    m = yc.shape[1] if yc is not None else 0
    inv_c = 1.0 / sigma_cond if sigma_cond is not None and yc is not None else 0.0
    fmap = _feature_map(kernel, d, m, 1.0 / sigma, inv_c, dim, seed, zc.device, cdt)
    width = dim if kernel == "gaussian" else d
    if yc is None:
        bc = None
    n = fb.shape[0]
    psi = fmap(phi, yc)  # (b, D)
    if n == 0 and not batch:
        return torch.zeros_like(zc), torch.full((b,), -math.inf, dtype=cdt, device=zc.device)

    key = _key(fb, bc, (kernel, width, sigma, inv_c, seed, normalize, str(cdt)))
    cached = _CACHE.get("bank")
    if not _same_bank(cached, key, fb, bc):
        cov, rows = _bank_moment(fmap, fb, bc, cdt, width) if n else (None, None)
        _CACHE["bank"] = cached = (key, cov, rows, None, _kept(fb, bc))
    _, cov, rows, eig, kept = cached
    if batch:  # the other current samples join the bank (constants)
        pb = psi.detach().to(torch.float64)
        if cov is not None:
            lam, vecs = _spectrum(cov + pb.T @ pb, None)
        else:
            allr = pb if rows is None else torch.cat([rows, pb])
            if allr.shape[0] >= width:
                lam, vecs = _spectrum(allr.T @ allr, None)
            else:
                lam, vecs = _spectrum(None, allr)
    else:
        if eig is None:
            eig = _spectrum(cov, rows)
            _CACHE["bank"] = (key, cov, rows, eig, kept)
        lam, vecs = eig
    lam = lam.clamp(min=0.0)
    p = lam / float(lam.sum())
    h = float(-(p[p > 0] * p[p > 0].log()).sum())
    p64 = psi.to(torch.float64)
    # the sample's own k(z, z) = ||psi||^2 (1 for rff and cosine): T = tr C + a, eps = a / 2
    a = (p64 * p64).sum(1, keepdim=True)  # (b, 1)
    trace = float(lam.sum()) + a
    eps = (0.5 * a).clamp(min=torch.finfo(torch.float64).tiny)  # psi = 0: log S = 0, grad 0
    ell0 = torch.log(eps / trace)  # (b, 1): L on the directions the bank does not span
    gain = torch.log(lam + eps) - torch.log(eps)  # (b, r): L - ell0 on the eigenvectors
    proj = p64 @ vecs  # (b, r)
    l_psi = (proj * gain) @ vecs.T + (ell0 + h) * p64  # (L + H I) psi
    log_s = (p64 * l_psi).sum(1)
    # d log S / d psi = 2 (L + H I) psi + c psi: c from eps and T, which move with ||psi||^2
    c = (proj * proj * (1.0 / (lam + eps) - 1.0 / eps)).sum(1, keepdim=True) + 2.0 - 2.0 * a / trace
    g_phi = fmap.vjp(phi, yc, (2.0 * l_psi + c * p64).to(cdt))
    if normalize:
        g_phi = (g_phi - phi * (phi * g_phi).sum(1, keepdim=True)) / znorm
    return -g_phi, log_s.to(cdt)


def dot_rke_guide(
    p: Problem, zc: torch.Tensor, yc: torch.Tensor | None, *, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """RKE guidance with a dot-product kernel: (-d log S / dz (b, D), log S (b,)).

    S_a = sum_j w_aj (psi_a . g_j)^2 over the bank (and, with ``p.batch``, the other current
    samples), psi = phi (linear) or phi / ||phi|| (cosine), g_j the bank rows alike,
    log w_aj = -||y_a - c_j||^2 / s_c^2 (0 without prompts), shifted by their row maximum M_a
    before exp (log S = M_a + log sum_j exp(log w_aj - M_a) (psi_a . g_j)^2, so a small s_c
    does not underflow the weights). S = 0 gives log S = -inf, grad 0.
    ``zc``, ``yc``: ``p.z`` and ``p.y`` in the compute dtype.
    """
    fb, bc, normalize, batch = p.bank, p.bank_cond, p.normalize, p.batch
    inv_c2 = 1.0 / p.sigma_cond**2 if p.sigma_cond is not None else 0.0
    fmap = _Map(kernel, None, 1.0, 1.0)
    znorm = zc.norm(dim=1, keepdim=True) if normalize else None
    phi = zc / znorm if normalize else zc
    psi = fmap(phi, None)
    rows = fb.to(zc.dtype)
    rows = fmap(rows, None) if kernel == "cosine" and rows.shape[0] else rows
    logw = None
    if yc is not None and bc is not None and bc.shape[0]:
        bcc = bc.to(zc.dtype)
        logw = -inv_c2 * ((yc * yc).sum(1)[:, None] + (bcc * bcc).sum(1)[None] - 2 * yc @ bcc.T)
    a = psi @ rows.T  # (b, n)
    logw = logw.clamp(max=0.0) if logw is not None else torch.zeros_like(a)
    if batch:
        pb = psi.detach()
        ab = psi @ pb.T
        logwb = torch.zeros_like(ab)
        if yc is not None:
            d2 = (yc * yc).sum(1)[:, None] + (yc * yc).sum(1)[None] - 2 * yc @ yc.T
            logwb = -inv_c2 * d2.clamp(min=0.0)
        logwb = logwb.diagonal_scatter(torch.full_like(ab[:, 0], -math.inf))  # not itself
        a, logw, rows = torch.cat([a, ab], 1), torch.cat([logw, logwb], 1), torch.cat([rows, pb])
    # the weights relative to each row's largest (log-sum-exp shift): w_aj = exp(-||y_a -
    # c_j||^2 / s_c^2) underflows for small s_c (s_c = 0.01: e^-10000), the shifted ones do not
    top = logw.amax(1, keepdim=True) if logw.shape[1] else logw.new_zeros(logw.shape[0], 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(logw - top)
    s = (w * a * a).sum(1)  # S / exp(top)
    g_psi = 2.0 * ((w * a) @ rows) / s.clamp(min=torch.finfo(s.dtype).tiny)[:, None]
    g_phi = fmap.vjp(phi, None, g_psi)
    if normalize:
        g_phi = (g_phi - phi * (phi * g_phi).sum(1, keepdim=True)) / znorm
    g = torch.where((s > 0)[:, None], -g_phi, torch.zeros_like(g_phi))
    return g, torch.log(s) + top[:, 0]
