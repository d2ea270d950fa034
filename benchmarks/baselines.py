"""What users would use instead of rkekernels, in one place (every benchmark imports these).

Each computes RKE(X) = n^2 / sum_ij exp(-||x_i - x_j||^2 / sigma^2) its own way.
"""

from __future__ import annotations

import numpy as np
import torch


def gemm(x: torch.Tensor) -> torch.Tensor:
    """One GEMM x @ x.T of the same x: the physical-limit proxy (it computes no kernel at all)."""
    return x @ x.T


def dense_torch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The naive dense version: cdist, exp, sum. O(n^2) memory."""
    d2 = torch.cdist(x, x).pow_(2)
    return x.shape[0] ** 2 / d2.div_(-(sigma**2)).exp_().sum(dtype=torch.float64)


def keops(x: torch.Tensor, sigma: float) -> float:
    """pykeops LazyTensor Gaussian sum (symbolic, streamed; CPU or GPU)."""
    from pykeops.torch import LazyTensor

    xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
    k2 = (-((xi - xj) ** 2).sum(-1) / (sigma**2)).exp()
    return x.shape[0] ** 2 / float(k2.sum(1).double().sum())


def vendi_q2(x: torch.Tensor, sigma: float) -> float:
    """vendi-score's order-2 Vendi score of the Gaussian kernel (dense kernel + eigenvalues)."""
    from vendi_score import vendi

    xd = x.double()
    K = torch.exp(-torch.cdist(xd, xd).pow(2) / (2 * sigma**2)).numpy()
    return float(vendi.score_K(K, q=2))


def rke_mc(x: torch.Tensor, sigma: float, n_samples: int = 100_000) -> float:
    """The rke-score package's Monte Carlo estimate (RKE-MC), ``n_samples`` random pairs."""
    from rke_score import RKE

    np.random.seed(0)  # noqa: NPY002 - rke-score draws its pairs from the legacy global RNG
    out = RKE(kernel_bandwidth=sigma).compute_rke_mc(x.double().numpy(), n_samples=n_samples)
    return float(out[sigma])


# --------------------------------------------------------------------------- order q (Vendi)


def vendi_score_K(K) -> float:
    """vendi-score's order-1 score of a precomputed (n, n) kernel matrix (scipy eigvalsh)."""
    from vendi_score import vendi

    return float(vendi.score_K(K, q=1))


def vendi_loop(x: torch.Tensor, sigma: float) -> float:
    """vendi-score end to end: ``vendi.score(samples, k)`` with the Gaussian k of its README's
    form (a Python function of two samples, called for every pair by its double loop)."""
    from vendi_score import vendi

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2.0 * sigma**2))

    return float(vendi.score(list(x.double().numpy()), k, q=1))


def cov_gemm(x: torch.Tensor) -> torch.Tensor:
    """One ``x.T @ x`` (d x d): the floor of any exact dot-kernel covariance."""
    return x.T @ x


def rff_floor(
    x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, blocks: list[tuple[int, int]]
) -> torch.Tensor:
    """The work random Fourier features cannot avoid, streamed in the same row blocks as the
    library: the projection x @ W and one Z.T @ Z of the (n, D) features, in float32.

    ``z`` is one block of stand-in features (rows >= the largest block), reused for every block:
    the GEMMs' cost does not depend on the values, and the (n, D) features of a large n would
    not fit in memory (n = 1,000,000, D = 4,096: 16 GB).
    """
    acc = z.new_zeros(z.shape[1], z.shape[1])
    for i0, i1 in blocks:
        x[i0:i1] @ w
        zb = z[: i1 - i0]
        acc += zb.T @ zb
    return acc
