"""The streaming Vendi metric (`VendiMetric`): random-feature covariances that add up.

Its states are feature covariances that simply add across batches and ranks (see `VendiMetric`);
`_VendiCore` (checks, features, covariances, result) is shared with
`rkekernels.metrics.TorchMetricsVendi`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .. import _collectives as C
from .._input import check_sigma
from .._methods import check_order
from ..ops import spectra
from .rke import _Stream, _sync_wanted

__all__ = ["VendiMetric", "VendiMetricResult"]


class VendiMetricResult(NamedTuple):
    """What `VendiMetric.compute` returns (0-dim float64 tensors).

    Attributes:
        vendi: Vendi_q(X) = exp(H_q(X)).
        cond_vendi: exp(H_q(X, T) - H_q(T)), or None without prompt embeddings.
        h_x, h_t, h_xt: the order-q entropies in nats (h_t, h_xt None without t).
    """

    vendi: torch.Tensor
    cond_vendi: torch.Tensor | None
    h_x: torch.Tensor
    h_t: torch.Tensor | None
    h_xt: torch.Tensor | None


class _VendiCore:
    """Shared by `VendiMetric` and `TorchMetricsVendi`: checks, features, covariances, result."""

    def __init__(self, sigma: Any, sigma_t: Any, q: Any, dim: Any, seed: Any):
        if sigma is None:
            raise ValueError(
                "sigma is None: a streaming metric needs a fixed bandwidth; pick one, e.g. "
                "rkekernels.default_bandwidth(first_batch)"
            )
        self.sigma = check_sigma(sigma, "sigma")
        self.sigma_t = check_sigma(sigma_t, "sigma_t") if sigma_t is not None else None
        self.q = check_order(q)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even integer >= 2 (random features); got {dim!r}")
        self.dim, self.seed = dim, int(seed)
        self.stream = _Stream(self.sigma, self.sigma_t)  # the batch checks of RKEMetric

    def check(self, x: Any, t: Any, width: tuple[int, int | None] | None, device: Any):
        """The batch checks of `RKEMetric.update` against the widths seen so far.

        Also: t is given exactly when the metric has a sigma_t, checked here at update time (a
        rank holding the wrong number of covariances would otherwise fail inside the sync).
        """
        x, t = self.stream.check_batch(
            x,
            t,
            width=width[0] if width else None,
            t_width=width[1] if width else None,
            has_t=(width[1] is not None) if width else None,
            device=device,
            dtype=None,
        )
        if (t is None) != (self.sigma_t is None):
            raise ValueError("t must be given exactly when the metric has a sigma_t")
        return x, t

    def covariances(self, x: torch.Tensor, t: torch.Tensor | None) -> list[torch.Tensor]:
        """[Phi_x^T Phi_x] (+ [Phi_t^T Phi_t, Phi_xt^T Phi_xt] with t), float64 (dim, dim)."""

        def cov(u: torch.Tensor, seed: int) -> torch.Tensor:
            f = spectra.rff_map(u.double(), self.dim, seed)(0, u.shape[0])
            return f.T @ f

        with torch.no_grad():
            out = [cov(x / self.sigma, self.seed)]
            if t is not None:
                joint = torch.cat([x / self.sigma, t / self.sigma_t], 1)  # Kx * Kt: one Gaussian
                out += [cov(t / self.sigma_t, self.seed), cov(joint, self.seed)]
        return out

    def result(self, covs: Sequence[torch.Tensor], n: int) -> VendiMetricResult:
        if n == 0:
            raise ValueError("compute() before any update: the metric holds no samples")

        def h(c: torch.Tensor) -> torch.Tensor:
            return spectra.renyi_entropy(spectra.spectrum_of_cov(c), self.q)

        h_x = h(covs[0])
        if len(covs) == 1:
            return VendiMetricResult(h_x.exp(), None, h_x, None, None)
        h_t, h_xt = h(covs[1]), h(covs[2])
        return VendiMetricResult(h_x.exp(), (h_xt - h_t).exp(), h_x, h_t, h_xt)


class VendiMetric:
    """Streaming Vendi score (and conditional Vendi) with random Fourier features.

    The Gaussian kernel k(a, b) = exp(-||a - b||^2 / (2 sigma^2)) is approximated by
    phi(a).phi(b) with ``dim`` random Fourier features of a / sigma (`rkekernels.ops.spectra`,
    the "rff" method of `rkekernels.vendi_score`); the non-zero eigenvalues of K / n are those
    of the feature covariance C = (1/n) sum_i phi(x_i) phi(x_i)^T, so the state is
    C_sum = sum_i phi(x_i) phi(x_i)^T (dim x dim, float64) and n: both add over batches and over
    ranks (one all-reduce). Vendi_q = exp(H_q(eig(C_sum / tr C_sum))). Conditional: the joint
    kernel Kx * Kt is the Gaussian kernel of [x / sigma, t / sigma_t] at bandwidth 1, so a
    second and third covariance (of t and of the concatenation) give
    CondVendi_q = exp(H_q(X, T) - H_q(T)). The result depends on ``seed`` only through the
    random-feature error (about 1/sqrt(dim)); every rank must use the same seed and dim.

    Args:
        sigma: one bandwidth s > 0 for x.
        sigma_t: bandwidth for prompt embeddings t (required when updates pass t).
        q: the order (> 0; 1 is the Vendi score of vendi-score; math.inf allowed).
        dim: number of random features (even); memory and all-reduce: 8 dim^2 bytes per state.
        seed: the random features' seed (the same on every rank).
        group, sync_on_compute: as in `RKEMetric`.

    Example:
        >>> import torch
        >>> from rkekernels.metrics import VendiMetric
        >>> m = VendiMetric(sigma=1.0, dim=2048)
        >>> centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
        >>> for c in centres:
        ...     m.update(c + 0.01 * torch.randn(20, 2))
        >>> round(float(m.compute().vendi), 1)
        3.0
    """

    def __init__(
        self,
        sigma: Any,
        sigma_t: Any = None,
        *,
        q: float = 1.0,
        dim: int = 1024,
        seed: int = 0,
        group: Any = None,
        sync_on_compute: bool = True,
    ):
        self._core = _VendiCore(sigma, sigma_t, q, dim, seed)
        self.group, self.sync_on_compute = group, bool(sync_on_compute)
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._covs: list[torch.Tensor] | None = None
        self._n = 0
        self._width: tuple[int, int | None] | None = None

    def __len__(self) -> int:
        """The number of samples seen on this rank."""
        return self._n

    def update(self, x: Any, t: Any = None) -> None:
        """Add a batch (b, d) of samples and, with sigma_t, its (b, m) prompt embeddings.

        Raises:
            ValueError / TypeError: as `RKEMetric.update`.
        """
        x, t = self._core.check(x, t, self._width, None)
        if x.shape[0] == 0:
            return
        covs = self._core.covariances(x, t)
        if self._covs is None:
            self._covs = covs
            self._width = (x.shape[1], t.shape[1] if t is not None else None)
        else:
            self._covs = [a + b.to(a.device) for a, b in zip(self._covs, covs)]
        self._n += x.shape[0]

    def compute(self) -> VendiMetricResult:
        """Vendi (and conditional Vendi) of every sample seen (all ranks' under distributed).

        Collective under an initialised process group with ``sync_on_compute``: every rank
        must call it, and every rank must have used the same kind of updates (with or without t).
        """
        covs, n = self._covs, self._n
        if _sync_wanted(self.sync_on_compute, self.group):
            dev = covs[0].device if covs is not None else torch.device("cpu")
            comm = C.comm_device(self.group, dev)
            k = 3 if self._core.sigma_t is not None else 1
            dim = self._core.dim
            flat = torch.zeros(k * dim * dim + 1, dtype=torch.float64, device=dev)
            if covs is not None:
                flat[:-1] = torch.cat([c.reshape(-1) for c in covs])
            flat[-1] = float(n)
            flat = C.all_reduce_sum(flat, self.group, comm)
            n = round(float(flat[-1]))
            covs = list(flat[:-1].reshape(k, dim, dim)) if n else None
        if n == 0 or covs is None:
            raise ValueError("compute() before any update: the metric holds no samples")
        return self._core.result(covs, n)
