"""rkekernels.metrics: the streaming RKEMetric (and TorchMetricsRKE) against one-shot scores.

Streaming must equal one-shot for batch sizes that do not divide n (float64: 1e-10 relative,
float32: 1e-5 against the float64 reference). The distributed sync of `compute` is tested in
test_distributed.py (spawned ranks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rkekernels
from rkekernels import metrics, reference
from rkekernels.metrics import RKEMetric, RKEMetricResult, cross_pair_sums
from tests.conftest import TOL, close

N, D, M = 53, 7, 4
SIGS = [0.6, 2.5, 40.0]
SIG, SIG_T = 2.5, 1.1


def _data(dtype=torch.float64, offset=30.0):
    g = torch.Generator().manual_seed(7)
    centres = 3.0 * torch.randn(4, D, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (N,), generator=g)
    x = centres[lab] + 0.7 * torch.randn(N, D, generator=g, dtype=torch.float64) + offset
    t = torch.randn(N, M, generator=g, dtype=torch.float64) + lab[:, None].double()
    return x.to(dtype), t.to(dtype)


def _feed(metric, x, t, batch):
    for i in range(0, x.shape[0], batch):
        metric.update(x[i : i + batch], None if t is None else t[i : i + batch])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 5, 11, 40, 100])  # none divides 53; 1 exercises coalescing
def test_streaming_equals_one_shot(dtype, batch):
    x, t = _data(dtype)
    metric = RKEMetric(SIGS, SIG_T)
    _feed(metric, x, t, batch)
    res = metric.compute()
    assert isinstance(res, RKEMetricResult)
    assert len(metric) == N
    tol = TOL[dtype]
    ref_rke = torch.stack([reference.rke_score(x, s) for s in SIGS])
    ref_cond = torch.stack([reference.cond_rke_score(x, t, s, SIG_T) for s in SIGS])
    close(res.rke, ref_rke, tol)
    close(res.cond_rke, ref_cond, tol)
    assert res.rke.dtype == dtype and res.rke.shape == (3,)
    ref_ent = [reference.rke_entropies(x, t, s, SIG_T) for s in SIGS]
    for k, got in enumerate(res.entropies):
        close(got, torch.stack([e[k] for e in ref_ent]), tol)
    if dtype == torch.float64:  # and the one-process API, to the last bits
        close(res.rke, rkekernels.rke_score(x, SIGS), 1e-12)


def test_streaming_without_t_single_sigma():
    x, _ = _data()
    metric = RKEMetric(SIG)
    _feed(metric, x, None, 9)
    res = metric.compute()
    assert res.cond_rke is None and res.entropies is None
    assert res.rke.shape == ()
    close(res.rke, reference.rke_score(x, SIG), 1e-10)
    # compute does not consume: more updates continue the same stream
    x2 = x[:13] + 5.0
    metric.update(x2)
    close(metric.compute().rke, reference.rke_score(torch.cat([x, x2]), SIG), 1e-10)


def test_huge_coordinates_and_extreme_sigma():
    x, _ = _data(offset=1e6)
    for s, want in ((1e-6, float(N)), (1e9, 1.0)):
        metric = RKEMetric(s)
        _feed(metric, x, None, 8)
        close(metric.compute().rke, want, 1e-9)
    metric = RKEMetric(SIG)
    _feed(metric, x, None, 8)
    close(metric.compute().rke, reference.rke_score(x, SIG), 1e-10)


def test_inputs_reset_device_and_dtype():
    x, t = _data()
    metric = RKEMetric(SIG, SIG_T, device="cpu")
    metric.update(x[:20].numpy(), t[:20].numpy())  # numpy in
    metric.update(x[20:20], t[20:20])  # empty batch: a no-op
    metric.update(x[20:].float(), t[20:].float())  # later batches take the first dtype
    assert metric._x[1].dtype == torch.float64
    close(metric.compute().cond_rke, reference.cond_rke_score(x, t, SIG, SIG_T), 1e-6)
    metric.to("cpu")
    metric.reset()
    assert len(metric) == 0
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    metric.update(x)  # after reset the t setting is free again
    close(metric.compute().rke, reference.rke_score(x, SIG), 1e-10)
    ints = RKEMetric(1.0)
    ints.update(np.array([[0], [10], [20]]))  # integers -> float32
    assert ints.compute().rke.dtype == torch.float32
    close(ints.compute().rke, 3.0, 1e-6)


def test_n_equals_one():
    metric = RKEMetric(1.0, 1.0)
    metric.update(torch.ones(1, 2), torch.ones(1, 3))
    res = metric.compute()
    close(res.rke, 1.0, 0.0)
    close(res.cond_rke, 1.0, 0.0)


def test_cross_pair_sums_matches_reference_and_shards():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 5, generator=g, dtype=torch.float64)
    b = torch.randn(1100, 5, generator=g, dtype=torch.float64) + 0.5
    ta = torch.randn(300, 2, generator=g, dtype=torch.float64)
    tb = torch.randn(1100, 2, generator=g, dtype=torch.float64)
    kx2 = [reference.gaussian_kernel(a, b, s) ** 2 for s in (0.8, 3.0)]
    kt2 = reference.gaussian_kernel(ta, tb, 1.5) ** 2
    want = torch.stack([k.sum() for k in kx2] + [kt2.sum()] + [(k * kt2).sum() for k in kx2])
    c = [1 / 0.8**2, 1 / 3.0**2]
    out, n_tiles = cross_pair_sums(a, b, c, ta, tb, 1 / 1.5**2, weight=2.0)
    close(out, 2.0 * want, 1e-12)
    # shards (rank, world) partition the tiles: their sums add up to the whole
    parts = [cross_pair_sums(a, b, c, ta, tb, 1 / 1.5**2, shard=(r, 3))[0] for r in range(3)]
    assert [int(p.abs().sum() > 0) for p in parts] == [1, 1, 0]  # 2 tiles over 3 shards
    close(sum(parts), want, 1e-12)
    # a shifted b (translation invariance)
    shift = torch.full((1, 5), 4.0, dtype=torch.float64)
    out2, _ = cross_pair_sums(a - 4.0, b, c, ta, tb, 1 / 1.5**2, shift=(shift, None))
    close(out2, want, 1e-12)
    assert n_tiles == 2  # 300 x 1100 rows in 1024 x 1024 tiles


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: RKEMetric(None), ValueError, "fixed bandwidth"),
        (lambda: RKEMetric(0.0), ValueError, "sigma must be finite and > 0"),
        (lambda: RKEMetric(float("inf")), ValueError, "sigma must be finite"),
        (lambda: RKEMetric([]), ValueError, "empty sequence"),
        (lambda: RKEMetric("1"), TypeError, "sigma"),
        (lambda: RKEMetric(1.0, -2.0), ValueError, "sigma_t must be finite and > 0"),
        (lambda: RKEMetric(1.0, [1.0, 2.0]), ValueError, "single bandwidth"),
    ],
)
def test_bad_constructor(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def _fresh():
    return RKEMetric(1.0, 1.0)


def _with_t():
    m = RKEMetric(1.0, 1.0)
    m.update(torch.ones(2, 3), torch.ones(2, 2))
    return m


def _without_t():
    m = RKEMetric(1.0, 1.0)
    m.update(torch.ones(2, 3))
    return m


@pytest.mark.parametrize(
    ("metric", "x", "t", "exc", "match"),
    [
        (_fresh, torch.ones(4), None, ValueError, "2-D"),
        (_fresh, torch.ones(2, 2, 2), None, ValueError, "reshape"),
        (_fresh, torch.ones(3, 0), None, ValueError, "d = 0"),
        (_fresh, torch.tensor([[float("nan")]]), None, ValueError, "x contains NaN"),
        (_fresh, torch.ones(2, 2), torch.tensor([[1.0], [float("inf")]]), ValueError, "t contains"),
        (_fresh, torch.ones(3, 2), torch.ones(2, 1), ValueError, "same number of rows"),
        (_fresh, torch.ones(3, 2), torch.ones(3), ValueError, "t must be 2-D"),
        (_fresh, np.ones((2, 2), complex), None, TypeError, "complex"),
        (_fresh, np.array([["a", "b"]]), None, TypeError, "string"),
        (_fresh, np.array([[object()]]), None, TypeError, "object"),
        (_with_t, torch.ones(2, 3), None, ValueError, "in some updates and not in others"),
        (_without_t, torch.ones(2, 3), torch.ones(2, 2), ValueError, "not given in earlier"),
        (_with_t, torch.ones(2, 4), torch.ones(2, 2), ValueError, "same width d"),
        (_with_t, torch.ones(2, 3), torch.ones(2, 5), ValueError, "same width m"),
        (lambda: RKEMetric(1.0), torch.ones(2, 2), torch.ones(2, 2), ValueError, "no sigma_t"),
    ],
)
def test_bad_update(metric, x, t, exc, match):
    m = metric()
    before = len(m)
    with pytest.raises(exc, match=match):
        m.update(x, t)
    assert len(m) == before  # a rejected batch leaves the state alone


def test_compute_before_update():
    with pytest.raises(ValueError, match="before any update"):
        RKEMetric(1.0).compute()


# --------------------------------------------------------------------------- torchmetrics


def test_torchmetrics_metric():
    pytest.importorskip("torchmetrics")  # installed in the test environment: runs here
    import torchmetrics

    cls = metrics.TorchMetricsRKE
    assert cls is metrics.TorchMetricsRKE  # built once
    x, t = _data()
    m = cls(SIGS, SIG_T)
    assert isinstance(m, torchmetrics.Metric)
    batch_vals = []
    for i in range(0, N, 17):  # forward: the batch value, and the stream grows
        batch_vals.append(m(x[i : i + 17], t[i : i + 17]))
    close(batch_vals[-1].rke, rkekernels.rke_score(x[51:], SIGS), 1e-10)
    res = m.compute()
    close(res.rke, torch.stack([reference.rke_score(x, s) for s in SIGS]), 1e-10)
    close(res.cond_rke, rkekernels.cond_rke_score(x, t, SIGS, SIG_T), 1e-10)
    assert int(m.n) == N
    m.reset()
    assert int(m.n) == 0 and len(m.feats) == 0
    _feed(m, x, None, 2)  # after reset: without t, many small batches (coalescing)
    close(m.compute().rke, torch.stack([reference.rke_score(x, s) for s in SIGS]), 1e-10)
    with pytest.raises(ValueError, match="not given in earlier updates"):
        m.update(x[:2], t[:2])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="before any update"):
        cls(1.0).compute()
    with pytest.raises(AttributeError, match="no attribute"):
        metrics.NotAThing  # noqa: B018
