"""The torchmetrics forms of the streaming metrics, built on first access.

`TorchMetricsRKE` (`RKEMetric` as a ``torchmetrics.Metric``) and `TorchMetricsVendi`
(`VendiMetric`): `build` creates a class when ``rkekernels.metrics`` is first asked for it, so
importing the package never requires torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch

from .rke import _COALESCE, RKEMetricResult, _Stream
from .vendi import VendiMetricResult, _VendiCore

#: the module the classes report (where they are imported from)
_PUBLIC_MODULE = "rkekernels.metrics"


def _make_torchmetrics_class() -> type:
    from torchmetrics import Metric

    class TorchMetricsRKE(Metric):
        """`RKEMetric` as a ``torchmetrics.Metric``: the same streaming sums and results.

        States: ``feats``/``conds`` (lists of the stored batches), ``sums`` (float64 running pair
        sums), ``n``. Syncing across processes does not concatenate the sums (they would miss the
        cross-rank pairs): it all-gathers the features and adds the cross-rank blocks, split over
        the ranks (``dist_sync_fn`` is not used). ``forward`` returns the scores of the batch.

        Args:
            sigma, sigma_t: as `RKEMetric`.
            **kwargs: torchmetrics options (``process_group``, ``sync_on_compute``, ...).

        Example:
            >>> import torch
            >>> from rkekernels.metrics import TorchMetricsRKE
            >>> m = TorchMetricsRKE(sigma=1.0)
            >>> m.update(torch.tensor([[0.0], [100.0], [200.0]]))
            >>> round(float(m.compute().rke), 4)
            3.0
        """

        full_state_update = True
        is_differentiable = False
        higher_is_better = True

        def __init__(self, sigma: Any, sigma_t: Any = None, **kwargs: Any):
            super().__init__(**kwargs)
            self._core = _Stream(sigma, sigma_t)
            self.add_state("feats", default=[], dist_reduce_fx="cat")
            self.add_state("conds", default=[], dist_reduce_fx="cat")
            self.add_state("sums", default=self._core.zeros(), dist_reduce_fx="sum")
            self.add_state("n", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
            self._synced_dtype: torch.dtype | None = None
            self._synced_with_t = False

        def update(self, x: Any, t: Any = None) -> None:
            """Add a batch (see `RKEMetric.update`)."""
            first = self.feats[0] if len(self.feats) else None
            x, t = self._core.check_batch(
                x,
                t,
                width=first.shape[1] if first is not None else None,
                t_width=self.conds[0].shape[1] if len(self.conds) else None,
                has_t=(len(self.conds) > 0) if first is not None else None,
                device=self.device,
                dtype=first.dtype if first is not None else None,
            )
            if x.shape[0] == 0:
                return
            self.sums = self.sums + self._core.delta(self.feats, self.conds, x, t).to(
                self.sums.device
            )
            self.feats.append(x)
            if t is not None:
                self.conds.append(t)
            self.n = self.n + x.shape[0]
            if len(self.feats) > _COALESCE:
                self.feats = [torch.cat(list(self.feats))]
                self.conds = [torch.cat(list(self.conds))] if len(self.conds) else []

        def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
            total, n, dtype, with_t = self._core.global_sums(
                self.feats, self.conds, self.sums, process_group or self.process_group
            )
            self.sums = total
            self.n = torch.tensor(n, dtype=torch.int64, device=self.n.device)
            self._synced_dtype, self._synced_with_t = dtype, with_t

        def compute(self) -> RKEMetricResult:
            """The scores (see `RKEMetric.compute`)."""
            n = int(self.n)
            if n == 0:
                raise ValueError("compute() before any update: the metric holds no samples")
            if self._is_synced and self._synced_dtype is not None:
                dtype, with_t = self._synced_dtype, self._synced_with_t
            else:
                dtype = self.feats[0].dtype
                with_t = len(self.conds) > 0
            return self._core.result(self.sums, n, dtype, with_t)

    TorchMetricsRKE.__module__ = _PUBLIC_MODULE
    return TorchMetricsRKE


def _make_torchmetrics_vendi() -> type:
    from torchmetrics import Metric

    class TorchMetricsVendi(Metric):
        """`VendiMetric` as a ``torchmetrics.Metric``: covariance states reduced by "sum".

        States ``cov_x`` (and ``cov_t``, ``cov_xt`` with sigma_t), each (dim, dim) float64, and
        ``n``; torchmetrics' own sync (all-gather, then sum) gives the covariances of the union
        of all ranks' samples, hence its exact random-feature Vendi.

        Args:
            sigma, sigma_t, q, dim, seed: as `VendiMetric`.
            **kwargs: torchmetrics options.

        Example:
            >>> import torch
            >>> from rkekernels.metrics import TorchMetricsVendi
            >>> m = TorchMetricsVendi(sigma=1.0, dim=2048)
            >>> m.update(torch.tensor([[0.0], [50.0], [100.0]]))
            >>> round(float(m.compute().vendi), 2)
            3.0
        """

        full_state_update = False
        is_differentiable = False
        higher_is_better = True

        def __init__(
            self,
            sigma: Any,
            sigma_t: Any = None,
            *,
            q: float = 1.0,
            dim: int = 1024,
            seed: int = 0,
            **kwargs: Any,
        ):
            super().__init__(**kwargs)
            self._core = _VendiCore(sigma, sigma_t, q, dim, seed)
            zero = torch.zeros(dim, dim, dtype=torch.float64)
            names = ["cov_x"] + (["cov_t", "cov_xt"] if sigma_t is not None else [])
            for name in names:
                self.add_state(name, default=zero.clone(), dist_reduce_fx="sum")
            self._names = names
            self.add_state("n", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
            self._width: tuple[int, int | None] | None = None

        def update(self, x: Any, t: Any = None) -> None:
            """Add a batch (see `VendiMetric.update`)."""
            x, t = self._core.check(x, t, self._width, self.device)
            if x.shape[0] == 0:
                return
            self._width = (x.shape[1], t.shape[1] if t is not None else None)
            for name, c in zip(self._names, self._core.covariances(x, t)):
                setattr(self, name, getattr(self, name) + c.to(self.device))
            self.n = self.n + x.shape[0]

        def reset(self) -> None:
            """Forget every sample and the width (as `VendiMetric.reset`)."""
            super().reset()
            self._width = None

        def forward(self, x: Any, t: Any = None) -> VendiMetricResult:
            """Add a batch and return its own scores (torchmetrics' ``forward``).

            torchmetrics resets the metric to score the batch alone: the batch is checked
            against the width held before, and that width is kept.
            """
            width = self._width
            self._core.check(x, t, width, self.device)
            try:
                return super().forward(x, t)
            finally:
                if width is not None:
                    self._width = width

        def compute(self) -> VendiMetricResult:
            """Vendi and conditional Vendi (see `VendiMetric.compute`)."""
            return self._core.result([getattr(self, k) for k in self._names], int(self.n))

    TorchMetricsVendi.__module__ = _PUBLIC_MODULE
    return TorchMetricsVendi


#: the torchmetrics classes, built on first access: name -> (factory, the metric without
#: torchmetrics)
_TM_FACTORIES = {
    "TorchMetricsRKE": (_make_torchmetrics_class, "RKEMetric"),
    "TorchMetricsVendi": (_make_torchmetrics_vendi, "VendiMetric"),
}
_TM_BUILT: dict[str, type] = {}


def build(name: str) -> type:
    """The torchmetrics class ``name`` ("TorchMetricsRKE" or "TorchMetricsVendi"), built once.

    Raises:
        AttributeError: another name. ImportError: torchmetrics is not installed.
    """
    if name not in _TM_FACTORIES:
        raise AttributeError(f"module {_PUBLIC_MODULE!r} has no attribute {name!r}")
    if name not in _TM_BUILT:
        make, plain = _TM_FACTORIES[name]
        try:
            _TM_BUILT[name] = make()
        except ImportError as exc:
            raise ImportError(
                f"rkekernels.metrics.{name} needs torchmetrics: "
                f"`pip install torchmetrics` (or use rkekernels.metrics.{plain})"
            ) from exc
    return _TM_BUILT[name]
