"""The frontier benchmark's peers and measures on tiny inputs (no training)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_frontier as bf
from benchmarks.guidance_peers import CADS, ParticleGuidance, cads_gamma, cads_noise, particle_grad


def test_particle_grad_pushes_apart_and_matches_autograd():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.5], [3.0, -1.0]], dtype=torch.float64)
    d2 = torch.cdist(x, x) ** 2
    iu = torch.triu_indices(3, 3, 1)
    h = float(d2[iu[0], iu[1]].median()) / math.log(3)
    z = x.clone().requires_grad_(True)
    phi = torch.exp(-(torch.cdist(z, z) ** 2) / h).sum() / 2  # each pair once per row
    (g,) = torch.autograd.grad(phi, z)
    assert torch.allclose(particle_grad(x), -g, atol=1e-12)
    assert torch.equal(particle_grad(torch.ones(1, 2)), torch.zeros(1, 2))
    pg = ParticleGuidance(lambda x, s: x, alpha=0.0)
    assert torch.equal(pg(x, torch.ones(3)), x)


def test_cads_schedule_and_noise():
    assert cads_gamma(0.0) == 1.0 and cads_gamma(1.0) == 0.0
    assert cads_gamma(0.75) == pytest.approx(0.5)
    y = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    noisy = cads_noise(y, 0.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(noisy, y)
    assert float(noisy.mean()) == pytest.approx(float(y.mean()), abs=1e-5)  # rescaled
    assert float(noisy.std()) == pytest.approx(float(y.std()), rel=1e-5)
    seen = []
    sigmas = torch.tensor([10.0, 1.0, 0.1, 0.0])

    def model(x, sigma, emb):
        seen.append(emb)
        return x

    clean = torch.arange(4.0)[None]
    cads = CADS(model, lambda c: clean, sigmas, s=1.0)
    cads(torch.zeros(1, 2), 10.0)  # t = 1: pure noise condition
    cads(torch.zeros(1, 2), 0.1)  # t = 1/3: the clean condition
    assert not torch.equal(seen[0], clean) and torch.equal(seen[1], clean)


def test_measures():
    assert bf.effective_classes([3, 3, 3]) == pytest.approx(1.0)
    assert bf.effective_classes(list(range(10))) == pytest.approx(10.0)
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert bf.knn_precision_recall(real, real, k=1) == (1.0, 1.0)
    assert bf.knn_precision_recall(real, torch.tensor([[0.5], [0.6], [20.0], [20.1]]), k=1) == (
        0.5,
        0.0,
    )
    r, v = bf.within_class(torch.tensor([[0.0], [0.0], [5.0], [9.0]]), [0, 0, 1, 1], 1.0)
    assert r == pytest.approx(1.5, rel=1e-3) and v == pytest.approx(1.5, rel=1e-3)
    assert bf.real_sigma(torch.arange(12.0)[:, None], k=3) == pytest.approx(2.0)


def test_denoiser_and_methods_run_untrained():
    torch.manual_seed(0)
    model = bf.Denoiser(width=16, depth=1, n_classes=10, emb=4).eval()
    sigmas = bf.get_sigmas_karras(3, 0.01, 10.0)
    lab = torch.full((2,), 3)
    x = torch.randn(2, 64)
    for m in bf.methods(conditional=True, quick=True):
        m.start(model, 0)
        out = bf.sample_euler(m.denoiser(sigmas, lab, 0), x, sigmas, {"cond": lab})
        m.commit(out, lab)
        assert out.shape == (2, 64) and torch.isfinite(out).all(), m.setting
    assert {m.kind for m in bf.methods(True, True)} == {
        "none",
        "sparke",
        "vendi",
        "particle",
        "cads",
    }


def test_seed_rows_pair_with_unguided(tmp_path, monkeypatch):
    monkeypatch.setattr(bf, "RESULTS", tmp_path)
    rep = bf._seed_report("knee_test", 2.0)
    ung, meas = {}, dict(eff_classes=5.0, rke_within=4.0, precision=0.8, recall=0.5)
    bf._add_seed_row(
        rep, ung, "cond", bf.Method("none", "-"), 0, {**meas, "consistency": 1.0}, True
    )
    guided = dict(meas, rke_within=5.0, precision=0.76, consistency=0.97)
    bf._add_seed_row(rep, ung, "cond", bf.Method("sparke", "scale=0.2", scale=0.2), 0, guided, True)
    row = rep.rows[-1]
    assert row["diversity_vs_none"] == pytest.approx(1.25)
    assert row["precision_vs_none"] == pytest.approx(0.95)
    assert row["consistency_vs_none"] == pytest.approx(0.97)
    assert (tmp_path / "knee_test_seeds.csv").exists()
