"""evaluate's paths: the shared exact pass, the measured crossover and the ``methods`` key."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import rkekernels
from rkekernels.evaluation import paths, relative_rke, rke_interval, sample_sums
from rkekernels.evaluation.novelty import ken_novelty
from rkekernels.evaluation.workbench import evaluate


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (rng.normal(size=(90, 3)) + 0.5).astype(np.float32)
    gx, gy = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(gx, x)
    np.save(gy, y)
    return str(gx), str(gy), x, y


def test_methods_exact_small(files):
    gx, gy, x, _ = files
    keep: dict = {}
    out = evaluate(gx, gy, cache_dir=None, null_draws=3, _keep=keep)
    names = ["rke", "rke_interval", "vendi", "modes", "relative_rke", "novelty", "sweep"]
    assert out["methods"] == dict.fromkeys(names, "exact")
    assert "methods_error" not in out
    s = out["sigma"]
    assert out["vendi"] == float(rkekernels.vendi_score(x, 1.0, s, method="exact"))


def test_shared_pass_matches_the_separate_calls(files):
    """The one pass gives what rke_interval and sample_sums gave separately, to float32
    rounding: the pass squares tiles along the sweep's half-octave grid where the separate
    calls take each exp (`scores_torch.power_plan`; <= 2^3 x one exp's rounding)."""
    gx, _, x, _ = files
    keep: dict = {}
    out = evaluate(gx, sigma=[0.7, 1.3], cache_dir=None, _keep=keep)
    ci = rke_interval(x, [0.7, 1.3])
    close = functools.partial(pytest.approx, rel=1e-7, abs=0.0)
    assert out["rke"] == close([float(v) for v in ci.estimate])
    assert out["rke_interval"]["low"] == close([float(v) for v in ci.low])
    sums = sample_sums(x, sigma=0.7).x
    assert out["most_crowded"][0]["s"] == close(float(sums.max()))
    grid = [0.7 * 2.0 ** (k / 2.0) for k in range(-4, 5)]
    sweep = rke_interval(x, grid)
    assert keep["sweep"]["rke"] == close([float(v) for v in sweep.estimate])
    assert keep["sweep"]["high"] == close([float(v) for v in sweep.high])


def test_methods_forced_approximate(files, monkeypatch):
    """With no time allowed to exact eigen paths they run through rff and state the error."""
    gx, gy, x, y = files
    monkeypatch.setattr(paths, "EXACT_MIN_S", 0.0)
    monkeypatch.setattr(paths, "EXACT_SHARE", 0.0)
    monkeypatch.setattr(paths, "PROBE_N", 8)
    monkeypatch.setattr(paths, "APPROX_DIM", 16)  # sets above 16 rows may go approximate
    monkeypatch.setattr(paths, "approx_seconds", lambda *a: 0.0)
    out = evaluate(gx, gy, cache_dir=None, null_draws=0)
    m = out["methods"]
    assert m["rke"] == m["rke_interval"] == "exact"
    assert m["vendi"] == m["modes"] == m["novelty"] == m["relative_rke"] == "rff"
    err = 1.0 / math.sqrt(paths.APPROX_DIM)
    rel_err = out["methods_error"].pop("relative_rke")
    assert out["methods_error"] == {"vendi": err, "modes": err, "novelty": err}
    exact = float(relative_rke(x, y, out["sigma"]))
    assert 0.0 < rel_err < 0.2
    assert abs(out["relative_rke"] / exact - 1.0) < 4.0 * rel_err
    s = out["sigma"]
    want = rkekernels.vendi_score(x, 1.0, s, method="rff", dim=paths.APPROX_DIM)
    assert out["vendi"] == float(want)
    nov = ken_novelty(x, y, s, method="rff", dim=paths.APPROX_DIM, per_mode=8)
    assert out["novelty"] == nov.score


def test_pick_eigen_scales_with_the_floor(monkeypatch):
    """The crossover moves with the measured floor, not a fixed n."""
    monkeypatch.setattr(paths, "EXACT_MIN_S", 0.0)
    monkeypatch.setattr(paths, "approx_seconds", lambda *a: 0.0)
    t = paths.exact_seconds(4000, "eigvalsh", 1, 0.0, 4000)
    # predicted t + floor (the Gram build) against EXACT_SHARE = 1.5 floors: exact iff floor >= 2t
    assert paths.pick_eigen(4000, "eigvalsh", 1, 2.1 * t, 4000, 8)[0] == "exact"
    assert paths.pick_eigen(4000, "eigvalsh", 1, 1.9 * t, 4000, 8)[0] == "rff"
    assert paths.pick_eigen(1000, "eigvalsh", 1, 0.0, 1000, 8) == ("exact", 0.0)


@pytest.mark.parametrize("draws", [0, 9])
def test_ken_rff_streamed_matches_the_materialised_features(draws):
    """KEN's rff path streams the covariances (no (n + m, d) float64 copy, float32 features):
    the same score, modes and null as the float64 features held in full, to float32 rounding."""
    from rkekernels.evaluation import novelty as nv

    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(30, 6)), rng.normal(size=(10, 6)) + 4.0])
    y = rng.normal(size=(90, 6))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    got = ken_novelty(xt, yt, 1.5, method="rff", dim=64, null_draws=draws, seed=3)
    both = torch.cat([xt, yt]).double()
    bc = both - both.mean(0)
    if draws:
        want = nv._ken_null(bc, 40, 1.5, "rff", 64, 1.0, 8, 16, draws, 3)
    else:
        f = nv._features(bc, 1.5, "rff", 64, 3)
        want = nv._ken_features(f[:40], f[40:], 1.0, 8, 16)
    assert got.score == pytest.approx(want.score, rel=1e-4)
    assert got.score > 0.05  # the new mode is there
    assert [m.members.tolist() for m in got.modes[:2]] == [
        m.members.tolist() for m in want.modes[:2]
    ]
    if draws:
        assert got.null_mean == pytest.approx(want.null_mean, rel=1e-3)
        assert got.p_value == want.p_value


def test_block_null_agrees_with_the_subset_null(monkeypatch):
    """Large n: null draws as unions of reference blocks (`novelty._null_blocks`) give the
    null of independent subsets (its mean within a null standard deviation, the same verdict)."""
    from rkekernels.evaluation import novelty as nv

    rng = np.random.default_rng(0)
    c = rng.normal(size=(20, 8)) * 3

    def draw(k, shift=0.0):
        rows = c[rng.integers(0, 20, k)] + rng.normal(size=(k, 8)) + shift
        return torch.tensor(rows, dtype=torch.float32)

    y, same, new = draw(3000), draw(600), torch.cat([draw(480), draw(120, 6.0)])
    got = {}
    for label, least in (("subsets", 10**9), ("blocks", 64)):
        monkeypatch.setattr(nv, "BLOCK_NULL_MIN", least)
        got[label] = [
            ken_novelty(x, y, 2.0, method="rff", dim=64, null_draws=19) for x in (same, new)
        ]
    for a, b in zip(got["subsets"], got["blocks"]):
        assert a.score == b.score  # the observed KEN does not depend on the null
        assert abs(a.null_mean - b.null_mean) < max(a.null_std, b.null_std)
    assert got["blocks"][0].p_value > 0.2 and got["blocks"][1].p_value == 0.05
    assert got["subsets"][0].p_value > 0.2 and got["subsets"][1].p_value == 0.05


def test_reference_paths_chosen_by_cost(files, monkeypatch):
    """The reference's passes follow the budget: cheap -> exact / all rows, else rff / a
    subsample (recorded), and KEN's null dim shrinks to fit."""
    assert paths.pick_pairs(1e6, 1.0, 1000) == "exact"  # 2x the pass, under EXACT_MIN_S
    assert paths.pick_pairs(1e9, 1.0, 1000) == "rff"
    assert paths.null_dim(0, 1.0) == paths.APPROX_DIM
    assert paths.null_dim(10**9, 0.0) == paths.MIN_NULL_DIM
    assert paths.ref_rows(10, 100) is None
    rows = paths.ref_rows(1000, 100)
    assert len(rows) == int(100 * math.sqrt(paths.REF_SHARE)) and bool((rows.diff() > 0).all())
    gx, gy, _, _ = files
    monkeypatch.setattr(paths, "REF_SHARE", 0.25)  # 40 GEN rows: 20 of the 90 reference rows
    keep: dict = {}
    evaluate(gx, gy, cache_dir=None, null_draws=0, _keep=keep)
    assert keep["ref_sweep"]["rows"] == 20
    full = evaluate(gy, cache_dir=None, sigma=[keep["sigma"]], _keep=(k2 := {}))
    assert full["n"] == 90 and k2["sweep"]["rke"] != keep["ref_sweep"]["rke"]
