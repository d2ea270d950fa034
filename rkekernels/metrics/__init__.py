"""A streaming RKE metric: feed batches with ``update``, read the scores with ``compute``.

The scores depend on the data only through three pair sums over all ordered pairs (SPEC 2)::

    F_x[k] = sum_ij Kx_k^2,   F_t = sum_ij Kt^2,   F_xt[k] = sum_ij Kx_k^2 Kt^2

When a batch B joins the stored set A, each sum grows by the B x B block plus twice the A x B
block (the kernel is symmetric)::

    F(A u B) = F(A) + F(B) + 2 sum_{i in A, j in B} k(a_i, b_j)^2

so ``update`` costs O(|B| |A| d) + O(|B|^2 d): only the new terms, never the old ones again. The
running sums are float64; the B x B block uses the one-process kernel
(`rkekernels.ops.scores_torch.forward_sums`), the A x B block is streamed tile by tile
(`cross_pair_sums`). Centring: the kernel is translation invariant, so both blocks of a tile are
shifted by the same point, the mean of the new batch, before ``||a||^2 + ||b||^2 - 2 a.b``.
Stored features stay raw (on the metric's device, in the dtype of the first batch).

Under ``torch.distributed`` (an initialised process group), ``compute`` is collective: every rank
all-gathers the other ranks' stored features, the cross-rank blocks are split over the ranks
tile by tile, and one all-reduce adds everything. The result is the score of the union of all
ranks' updates, the same on every rank; the local state is unchanged (updates may go on).

`RKEMetric` is plain Python; `TorchMetricsRKE` is the same metric as a ``torchmetrics.Metric``
(created on first access, so importing this package never requires torchmetrics).

`VendiMetric` / `TorchMetricsVendi` stream the order-q Vendi score (and conditional Vendi)
through random Fourier features: their states are feature covariances that simply add across
batches and ranks (see `VendiMetric`).

Modules: `rkekernels.metrics.rke` (`RKEMetric`, `cross_pair_sums`), `rkekernels.metrics.vendi`
(`VendiMetric`), `rkekernels.metrics._torchmetrics` (the torchmetrics classes); everything is
importable from ``rkekernels.metrics``.
"""

from __future__ import annotations

from typing import Any

from . import _torchmetrics
from .rke import RKEMetric, RKEMetricResult, cross_pair_sums
from .vendi import VendiMetric, VendiMetricResult

__all__ = [
    "RKEMetric",
    "RKEMetricResult",
    "VendiMetric",
    "VendiMetricResult",
    "cross_pair_sums",
]  # + TorchMetricsRKE, TorchMetricsVendi, lazily


def __getattr__(name: str) -> Any:
    """``TorchMetricsRKE`` and ``TorchMetricsVendi`` are built on first access (torchmetrics)."""
    return _torchmetrics.build(name)
