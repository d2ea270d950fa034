"""Plain, dense, float64 reference implementations of every quantity in SPEC section 2.

Obviously correct and O(n^2) memory: build the kernel matrix, square it, sum it. Tests and
benchmarks import these (and only these) as ground truth; the fast paths never call them.
Gradients come from torch autograd through these functions. Every tensor returned lies on the
device of the input tensors (a CUDA input gives CUDA results, so they compare with a kernel's
output directly; tests/test_reference.py checks this on torch's "meta" device, which refuses to
mix devices as CUDA does).

Math (Gaussian kernel, sums over all ordered pairs, diagonal included)::

    k_s(a, b)   = exp(-||a - b||^2 / (2 s^2))
    RKE(X)      = n^2 / sum_ij Kx[i,j]^2
    H2(X)       = -log(sum_ij Kx^2 / n^2)
    H2(X, T)    = -log(sum_ij Kx^2 Kt^2 / n^2)
    CondRKE     = sum_ij Kt^2 / sum_ij Kx^2 Kt^2
    log S(z)    = logsumexp_j( log w_j - ||phi(z) - f_j||^2 / s^2 ),  w_j = k_sc(y, c_j)^2

Order q (the Vendi family; p = eigenvalues of K / tr K from a dense float64 eigvalsh)::

    H_q = log(sum p^q) / (1 - q),  H_1 = -sum p log p,  H_inf = -log max p,  Vendi_q = exp(H_q)
    H_q(X, T) from Kx * Kt (Hadamard),  CondVendi_q = exp(H_q(X, T) - H_q(T))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "Entropies",
    "cond_rke_jackknife",
    "cond_rke_score",
    "cond_vendi_score",
    "features",
    "gaussian_kernel",
    "grad_term_scale",
    "guidance_grad",
    "guidance_log_s",
    "ken_novelty",
    "kernel_matrix",
    "median_bandwidth",
    "pair_sums",
    "relative_rke",
    "renyi_entropy",
    "rke_entropies",
    "rke_jackknife",
    "rke_score",
    "sample_sums",
    "sq_dists",
    "vendi_entropies",
    "vendi_entropy",
    "vendi_score",
]


def _f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def sq_dists(a, b) -> torch.Tensor:
    """Squared Euclidean distances ||a_i - b_j||^2 as an (n, m) float64 matrix (exact form).

    The differences a_i - b_j are taken coordinate by coordinate (``torch.cdist`` without its
    matmul path), never through ||a||^2 + ||b||^2 - 2 a.b, so there is no cancellation; the
    square of cdist's square root differs from the sum of squares by at most a few ulp.
    """
    a, b = _f64(a), _f64(b)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def gaussian_kernel(a, b, sigma: float) -> torch.Tensor:
    """k_s(a_i, b_j) = exp(-||a_i - b_j||^2 / (2 sigma^2)), float64 (n, m)."""
    return torch.exp(-sq_dists(a, b) / (2.0 * float(sigma) ** 2))


def pair_sums(x, t=None, sigma: float = 1.0, sigma_t: float | None = None):
    """(sum Kx^2, sum Kt^2, sum Kx^2 Kt^2) in float64; the last two are None without ``t``."""
    kx2 = gaussian_kernel(x, x, sigma) ** 2
    if t is None:
        return kx2.sum(), None, None
    kt2 = gaussian_kernel(t, t, sigma_t) ** 2
    return kx2.sum(), kt2.sum(), (kx2 * kt2).sum()


def rke_score(x, sigma: float) -> torch.Tensor:
    """RKE(X) = n^2 / sum_ij k_s(x_i, x_j)^2 (float64, differentiable)."""
    x = _f64(x)
    n = x.shape[0]
    fx, _, _ = pair_sums(x, sigma=sigma)
    return n * n / fx


def cond_rke_score(x, t, sigma: float, sigma_t: float) -> torch.Tensor:
    """CondRKE(X|T) = sum Kt^2 / sum Kx^2 Kt^2 (float64, differentiable)."""
    _, ft, fxt = pair_sums(_f64(x), _f64(t), sigma, sigma_t)
    return ft / fxt


class Entropies(NamedTuple):
    h_x: torch.Tensor
    h_t: torch.Tensor
    h_xt: torch.Tensor
    h_x_given_t: torch.Tensor
    mutual_info: torch.Tensor


def rke_entropies(x, t, sigma: float, sigma_t: float) -> Entropies:
    """Order-2 Rényi kernel entropies in nats: H2(X), H2(T), H2(X,T), H2(X|T), I2(X;T)."""
    x, t = _f64(x), _f64(t)
    n = x.shape[0]
    fx, ft, fxt = pair_sums(x, t, sigma, sigma_t)
    log_n2 = 2.0 * math.log(n)
    h_x = log_n2 - torch.log(fx)
    h_t = log_n2 - torch.log(ft)
    h_xt = log_n2 - torch.log(fxt)
    return Entropies(h_x, h_t, h_xt, h_xt - h_t, h_x + h_t - h_xt)


def median_bandwidth(x) -> torch.Tensor:
    """Median of the pairwise distances ||x_i - x_j||, i < j, over all pairs (float64).

    The library's `median_bandwidth` uses exactly this on at most 1,000 rows (all rows when
    n <= 1,000); the fallbacks for degenerate sets (n = 1, all points equal) are its own.
    """
    x = _f64(x)
    n = x.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    d = sq_dists(x, x)[iu[0], iu[1]].sqrt()
    return torch.quantile(d, 0.5) if d.numel() else x.new_tensor(float("nan"))


# --------------------------------------------------------------------------- order q (Vendi)


def kernel_matrix(x, kernel: str = "gaussian", sigma: float | None = None) -> torch.Tensor:
    """K_ij = k(x_i, x_j) in float64: gaussian (un-squared), cosine or linear."""
    x = _f64(x)
    if kernel == "gaussian":
        return gaussian_kernel(x, x, sigma)
    if kernel == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T


def renyi_entropy(p, q: float) -> torch.Tensor:
    """Order-q Rényi entropy (nats) of the probability vector p.

    Entries <= len(p) * eps * max(p) count as 0 (round-off of a PSD spectrum: the numerical
    rank cut of ``torch.linalg.matrix_rank``).
    """
    p = _f64(p)
    p = p[p > len(p) * torch.finfo(torch.float64).eps * p.max()]
    if q == 1:
        return -(p * torch.log(p)).sum()
    if q == float("inf"):
        return -torch.log(p.max())
    return torch.log((p**q).sum()) / (1.0 - q)


def vendi_entropy(k, q: float) -> torch.Tensor:
    """H_q of the eigenvalues of K / tr(K) (dense float64 eigvalsh)."""
    k = _f64(k)
    return renyi_entropy(torch.linalg.eigvalsh(k / torch.trace(k)), q)


def vendi_score(x, q: float, sigma: float | None = None, kernel: str = "gaussian"):
    """Vendi_q(X) = exp(H_q(eig(K / tr K)))."""
    return torch.exp(vendi_entropy(kernel_matrix(x, kernel, sigma), q))


def vendi_entropies(x, t, q: float, sigma=None, sigma_t=None, kernel="gaussian") -> Entropies:
    """Order-q H(X), H(T), H(X,T) (joint kernel Kx * Kt), H(X|T), I(X;T), as Conditional-Vendi."""
    kx, kt = kernel_matrix(x, kernel, sigma), kernel_matrix(t, kernel, sigma_t)
    h_x, h_t, h_xt = (vendi_entropy(k, q) for k in (kx, kt, kx * kt))
    return Entropies(h_x, h_t, h_xt, h_xt - h_t, h_x + h_t - h_xt)


def cond_vendi_score(x, t, q: float, sigma=None, sigma_t=None, kernel="gaussian"):
    """exp(H_q(X, T) - H_q(T))."""
    return torch.exp(vendi_entropies(x, t, q, sigma, sigma_t, kernel).h_x_given_t)


# --------------------------------------------------------------------------- evaluation


def sample_sums(x, t=None, sigma: float = 1.0, sigma_t: float | None = None):
    """(sum_j Kx[i,j]^2, sum_j Kt^2, sum_j Kx^2 Kt^2) per row i, float64 (n,); None without t."""
    kx2 = gaussian_kernel(x, x, sigma) ** 2
    if t is None:
        return kx2.sum(1), None, None
    kt2 = gaussian_kernel(t, t, sigma_t) ** 2
    return kx2.sum(1), kt2.sum(1), (kx2 * kt2).sum(1)


def _off_diag_mean(k2: torch.Tensor) -> torch.Tensor:
    n = k2.shape[0]
    return (k2.sum() - k2.diagonal().sum()) / (n * (n - 1))


def _jackknife(stat, n: int) -> tuple[float, float]:
    """(stat(all rows), jackknife se of stat) by recomputing stat on every leave-one-out set."""
    idx = torch.arange(n)
    full = float(stat(idx))
    loo = torch.tensor([float(stat(idx[idx != i])) for i in range(n)], dtype=torch.float64)
    se = ((n - 1) / n * ((loo - loo.mean()) ** 2).sum()).sqrt()
    return full, float(se)


def rke_jackknife(x, sigma: float, unbiased: bool = False) -> tuple[float, float]:
    """(log RKE, jackknife se of log RKE), each leave-one-out score recomputed from scratch.

    Plug-in: RKE = n^2 / sum_ij Kx^2; unbiased: 1 / mean_{i != j} Kx^2.
    """
    k2 = gaussian_kernel(x, x, sigma) ** 2

    def stat(idx):
        sub = k2[idx][:, idx]
        if unbiased:
            return -torch.log(_off_diag_mean(sub))
        return torch.log(len(idx) ** 2 / sub.sum())

    return _jackknife(stat, k2.shape[0])


def cond_rke_jackknife(x, t, sigma: float, sigma_t: float, unbiased: bool = False):
    """(log CondRKE, jackknife se): sum Kt^2 / sum Kx^2 Kt^2 (off-diagonal only if unbiased)."""
    kx2 = gaussian_kernel(x, x, sigma) ** 2
    kt2 = gaussian_kernel(t, t, sigma_t) ** 2

    def stat(idx):
        a, b = kt2[idx][:, idx], (kx2 * kt2)[idx][:, idx]
        if unbiased:
            return torch.log(_off_diag_mean(a) / _off_diag_mean(b))
        return torch.log(a.sum() / b.sum())

    return _jackknife(stat, kx2.shape[0])


def relative_rke(x, y, sigma: float) -> torch.Tensor:
    """n m / sum_ij k_s(x_i, y_j)^2 over the cross pairs (float64)."""
    k2 = gaussian_kernel(x, y, sigma) ** 2
    return k2.shape[0] * k2.shape[1] / k2.sum()


def ken_novelty(x, y, sigma: float, eta: float = 1.0) -> tuple[float, torch.Tensor]:
    """(KEN score, eigenvalues descending) from the paper's fused, non-symmetric matrix.

    [[Kxx / n, sqrt(eta) Kxy / sqrt(nm)], [-sqrt(eta) Kyx / sqrt(nm), -eta Kyy / m]] (general
    eigenvalues, real parts); KEN = -sum_{l > 0} l log(l / sum_{l > 0} l).
    """
    n, m = len(x), len(y)
    kxx, kyy, kxy = (
        gaussian_kernel(x, x, sigma),
        gaussian_kernel(y, y, sigma),
        gaussian_kernel(x, y, sigma),
    )
    c = (eta / (n * m)) ** 0.5
    top = torch.cat([kxx / n, c * kxy], 1)
    bottom = torch.cat([-c * kxy.t(), -eta * kyy / m], 1)
    vals = torch.linalg.eigvals(torch.cat([top, bottom])).real.sort(descending=True).values
    pos = vals[vals > 1e-12]
    return float(-(pos * torch.log(pos / pos.sum())).sum()), vals


# --------------------------------------------------------------------------- guidance objective


def features(z, normalize: bool = True) -> torch.Tensor:
    """phi(z): flatten each sample to a row; optionally divide each row by its L2 norm."""
    z = _f64(z)
    f = z.reshape(z.shape[0], -1)
    return f / f.norm(dim=1, keepdim=True) if normalize else f


def guidance_log_s(
    z,
    bank,
    *,
    cond=None,
    bank_cond=None,
    sigma: float,
    sigma_cond: float | None = None,
    normalize: bool = True,
    include_batch: bool = True,
) -> torch.Tensor:
    """log S(z_a) for each of the b samples, float64 (b,), differentiable w.r.t. ``z``.

    S(z_a) = sum_j w_j k_s(phi(z_a), f_j)^2 over the bank entries f_j and, with
    ``include_batch``, the other current samples phi(z_c), c != a (treated as constants).
    w_j = k_sc(y_a, c_j)^2 with prompt embeddings, else 1. Empty sets give -inf.
    """
    z = _f64(z)
    b = z.shape[0]
    phi = features(z, normalize)
    bank = _f64(bank).reshape(-1, phi.shape[1]) if bank is not None else phi[:0]
    logits = -sq_dists(phi, bank) / float(sigma) ** 2  # (b, n)
    if cond is not None:
        cond, bank_cond = _f64(cond), _f64(bank_cond).reshape(-1, _f64(cond).shape[1])
        logits = logits - sq_dists(cond, bank_cond) / float(sigma_cond) ** 2
    if include_batch and b > 1:
        other = phi.detach()
        lb = -sq_dists(phi, other) / float(sigma) ** 2
        if cond is not None:
            lb = lb - sq_dists(cond, cond) / float(sigma_cond) ** 2
        eye = torch.eye(b, dtype=torch.bool, device=phi.device)
        lb = lb.masked_fill(eye, float("-inf"))
        logits = torch.cat([logits, lb], dim=1)
    if logits.shape[1] == 0:
        return phi.new_full((b,), float("-inf"))
    return torch.logsumexp(logits, dim=1)


def guidance_grad(z, bank, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(-d log S / dz with z's shape, log S (b,)) by float64 autograd of `guidance_log_s`.

    Each sample's gradient is taken of its own log S (the objectives are summed: with
    ``include_batch`` the other samples enter as constants, so the sum separates).
    """
    z = _f64(z).detach().requires_grad_(True)
    log_s = guidance_log_s(z, bank, **kwargs)
    finite = torch.isfinite(log_s)
    if not bool(finite.any()):
        return torch.zeros_like(z), log_s.detach()
    (g,) = torch.autograd.grad(log_s[finite].sum(), z)
    return -g, log_s.detach()


def grad_term_scale(x, t, sigmas, sigma_t, g_fx, g_ft, g_fxt):
    """The natural size of each gradient row of the pair sums, for error bounds (float64).

    With W^x_ij = sum_k 4 c_k (|g_x[k]| + |g_xt[k]| Kt^2) Kx_k^2 and
    W^t_ij = 4 c_t (|g_t| + sum_k |g_xt[k]| Kx_k^2) Kt^2 on centred data, returns
    (sum_j W^x_ij (||x_i|| + ||x_j||) (n,), sum_j W^t_ij (||t_i|| + ||t_j||) (n,)): every term of
    dL/dx_i = -sum_j W_ij (x_i - x_j) is at most this in norm, so a rounding error relative to it
    is the right measure of a streamed gradient's accuracy.
    """
    xc = _f64(x).detach()
    tc = _f64(t).detach()
    xc, tc = xc - xc.mean(0), tc - tc.mean(0)
    ct = 1.0 / float(sigma_t) ** 2
    kt2 = torch.exp(-ct * sq_dists(tc, tc))
    wx = xc.new_zeros((xc.shape[0], xc.shape[0]))
    wt = 4.0 * ct * kt2 * abs(float(g_ft))
    for k, s in enumerate(sigmas):
        c = 1.0 / float(s) ** 2
        kx2 = torch.exp(-c * sq_dists(xc, xc))
        wx += 4.0 * c * kx2 * (abs(float(g_fx[k])) + abs(float(g_fxt[k])) * kt2)
        wt += 4.0 * ct * kt2 * kx2 * abs(float(g_fxt[k]))

    def scale(w, v):
        nrm = v.norm(dim=1)
        return (w * (nrm[:, None] + nrm[None, :])).sum(1)

    return scale(wx, xc), scale(wt, tc)
