"""Streaming metrics: feed batches with ``update``, read the scores with ``compute``.

- `RKEMetric` (`rkekernels.metrics.rke`): the RKE scores from running pair sums, updated batch
  by batch at the cost of the new terms only, collective under ``torch.distributed``; also
  `cross_pair_sums`. The math and the streaming scheme are in that module's docstring.
- `VendiMetric` (`rkekernels.metrics.vendi`): the order-q Vendi score (and conditional Vendi)
  from random-feature covariances that add across batches and ranks.
- `TorchMetricsRKE` / `TorchMetricsVendi` (`rkekernels.metrics._torchmetrics`): the same metrics
  as ``torchmetrics.Metric`` classes, created on first access, so importing this package never
  requires torchmetrics.

Everything is importable from ``rkekernels.metrics``.
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
