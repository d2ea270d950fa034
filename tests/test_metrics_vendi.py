"""VendiMetric / TorchMetricsVendi: streamed covariance states equal the one-shot rff scores."""

import math

import pytest
import torch

import rkekernels
from rkekernels.metrics import VendiMetric


def _data(n=90):
    g = torch.Generator().manual_seed(7)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]], dtype=torch.float64)
    x = centres[torch.arange(n) % 3] + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double()
    return x, t


@pytest.mark.parametrize("q", [1.0, 2.0, math.inf])
def test_streaming_equals_one_shot_rff(q):
    x, t = _data()
    m = VendiMetric(1.0, 0.5, q=q, dim=256, seed=5)
    for i in range(0, len(x), 16):
        m.update(x[i : i + 16], t[i : i + 16])
    r = m.compute()
    want = rkekernels.vendi_score(x, q, 1.0, method="rff", dim=256, seed=5)
    want_c = rkekernels.cond_vendi_score(x, t, q, 1.0, 0.5, method="rff", dim=256, seed=5)
    torch.testing.assert_close(r.vendi, want.double(), rtol=1e-10, atol=0)
    torch.testing.assert_close(r.cond_vendi, want_c.double(), rtol=1e-10, atol=0)
    assert len(m) == len(x) and r.h_t is not None
    # and the random features estimate the exact scores
    exact = float(rkekernels.vendi_score(x, q, 1.0, method="exact"))
    assert abs(float(r.vendi) - exact) < 0.1 * exact


def test_without_prompts_reset_and_bad_input():
    x, _ = _data()
    m = VendiMetric(1.0, dim=128)
    m.update(x[:40])
    m.update(x[40:])
    assert m.compute().cond_vendi is None
    m.reset()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="dim must be an even"):
        VendiMetric(1.0, dim=7)
    with pytest.raises(ValueError, match="sigma is None"):
        VendiMetric(None)
    m.update(x[:5])
    with pytest.raises(ValueError, match="same width"):
        m.update(x[:5, :2])


def test_torchmetrics_vendi():
    pytest.importorskip("torchmetrics")
    from rkekernels.metrics import TorchMetricsVendi

    x, t = _data()
    tm = TorchMetricsVendi(1.0, 0.5, dim=256, seed=5)
    for i in range(0, len(x), 30):
        tm.update(x[i : i + 30], t[i : i + 30])
    r = tm.compute()
    want = rkekernels.cond_vendi_score(x, t, 1.0, 1.0, 0.5, method="rff", dim=256, seed=5)
    torch.testing.assert_close(r.cond_vendi, want.double(), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="in every update"):
        tm.update(x[:3])


def test_prompts_required_from_the_first_update():
    # a batch without t on a metric with sigma_t is refused at update time, on the rank at
    # fault, instead of leaving it with the wrong covariances for the collective sync
    x, t = _data()
    m = VendiMetric(1.0, 0.5, dim=128)
    with pytest.raises(ValueError, match="exactly when the metric has a sigma_t"):
        m.update(x[:5])
    assert len(m) == 0
    m.update(x[:5], t[:5])
    with pytest.raises(ValueError, match="has no sigma_t"):
        VendiMetric(1.0, dim=128).update(x[:5], t[:5])


def test_torchmetrics_vendi_reset_forgets_the_width():
    # issue 23 A.3: reset() must forget the width, as VendiMetric.reset() does; forward (which
    # resets internally to score the batch) must still refuse a batch of another width
    pytest.importorskip("torchmetrics")
    from rkekernels.metrics import TorchMetricsVendi

    x, t = _data()
    tm = TorchMetricsVendi(1.0, 0.5, dim=128, seed=5)
    plain = VendiMetric(1.0, 0.5, dim=128, seed=5)
    for m in (tm, plain):
        m.update(x[:10], t[:10])
        m.reset()
        m.update(x[:10, :2], t[:10, :1])  # a new width after the reset is accepted
        with pytest.raises(ValueError, match="same width"):
            m.update(x[:10], t[:10])
    torch.testing.assert_close(tm.compute().vendi, plain.compute().vendi, rtol=1e-12, atol=0)
    tm.forward(x[10:20, :2], t[10:20, :1])  # forward keeps the width it holds
    with pytest.raises(ValueError, match="same width"):
        tm.forward(x[:10], t[:10])
    assert int(tm.n) == 20
    with pytest.raises(ValueError, match="same width"):
        tm.update(x[:10], t[:10])
    tm.reset()
    tm.forward(x[:10], t[:10])  # a forward after a reset sets the width
    with pytest.raises(ValueError, match="same width"):
        tm.update(x[:10, :2], t[:10, :1])
