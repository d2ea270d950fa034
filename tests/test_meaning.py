"""Scores that mean something (issue 22, parts 2-5): one shared bandwidth in every comparison,
the sigma rule printed, KEN novelty against its null, modes that hold members, the report."""

import json

import numpy as np
import pytest
import torch

import rkekernels as rk
from rkekernels import evaluation as ev
from rkekernels.cli import main
from rkekernels.ops import spectra


def _blobs(rng, centres, per, spread=0.3):
    return np.concatenate([c + spread * rng.normal(size=(per, len(c))) for c in centres])


# --------------------------------------------------------------------------- novelty null


def test_null_reuses_the_documented_subsets_and_the_p_value_formula():
    rng = np.random.default_rng(0)
    centres = 6.0 * rng.normal(size=(3, 4))
    ref, gen = _blobs(rng, centres, 14), _blobs(rng, centres, 5)  # m = 42, n = 15
    n, m, s = len(gen), len(ref), 2.0
    nov = ev.ken_novelty(gen, ref, s, null_draws=1, seed=3)
    g = torch.Generator().manual_seed(3)
    sub = torch.randperm(m, generator=g)[: m - n].numpy()
    a = torch.randperm(m, generator=g)[:n].numpy()
    rest = np.setdiff1d(np.arange(m), a)
    want_obs = ev.ken_novelty(gen, ref[sub], s, method="exact").score
    want_null = ev.ken_novelty(ref[a], ref[rest], s, method="exact").score
    assert nov.score == pytest.approx(want_obs, rel=1e-6)
    assert nov.null_mean == pytest.approx(want_null, rel=1e-6) and nov.null_std == 0.0
    assert nov.p_value == (1 + (want_null >= nov.score)) / 2
    plain = ev.ken_novelty(gen, ref, s)
    assert plain.null_mean is None and plain.null_std is None and plain.p_value is None
    with pytest.raises(ValueError, match=r"null_draws=5 needs a reference of at least 2 len\(x\)"):
        ev.ken_novelty(gen, ref[: 2 * n - 1], s, null_draws=5)
    with pytest.raises(ValueError, match="null_draws must be an integer >= 0"):
        ev.ken_novelty(gen, ref, s, null_draws=-1)


def test_null_flags_a_missing_mode_and_not_a_fresh_sample():
    rng = np.random.default_rng(1)
    centres = 5.0 * rng.normal(size=(4, 3))
    ref = _blobs(rng, centres, 20, spread=1.0)  # m = 80
    same = _blobs(rng, centres, 5, spread=1.0)  # n = 20, from the reference's distribution
    new = 5.0 * rng.normal(size=3) + rng.normal(size=(20, 3))  # a mode ref lacks
    s = rk.default_bandwidth(ref)
    fresh = ev.ken_novelty(same, ref, s, null_draws=39, seed=0)
    novel = ev.ken_novelty(new, ref, s, null_draws=39, seed=0)
    assert fresh.p_value >= 0.05 and novel.p_value == 1 / 40
    assert novel.score > novel.null_mean + 5 * novel.null_std


def test_rff_takes_the_small_route_below_the_feature_count(monkeypatch):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(25, 5)) + 0.5
    # equal to the dim x dim route on the same features (dim = 256 > n + m = 45)
    both = torch.tensor(np.concatenate([x, y]))
    bc = both - both.mean(0)
    phi = spectra.rff_map(bc / 1.5, 256, 0)(0, 45).double()
    diff = phi[:20].T @ phi[:20] / 20 - phi[20:].T @ phi[20:] / 25
    vals = torch.linalg.eigvalsh(diff).flip(0)
    pos = vals[vals > 1e-12]
    want = float(-(pos * torch.log(pos / pos.sum())).sum())
    got = ev.ken_novelty(x, y, 1.5, method="rff", dim=256)
    assert got.score == pytest.approx(want, rel=1e-8)
    # dim 8,192 with 45 samples: no eigenproblem larger than 45 x 45 (it used to be 8,192^2)
    sizes = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: sizes.append(a.shape[0]) or eigh(a))
    big = ev.ken_novelty(x, y, 1.5, method="rff", dim=8192)
    assert max(sizes) <= 45
    exact = ev.ken_novelty(x, y, 1.5, method="exact").score
    assert big.score == pytest.approx(exact, rel=0.05)  # the RFF error at dim 8,192


# --------------------------------------------------------------------------- evaluate


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    centres = 8.0 * rng.normal(size=(3, 4))
    paths = {}
    for name, arr in {
        "gen": _blobs(rng, centres, 6),  # n = 18
        "ref": 1.5 * _blobs(rng, centres, 12),  # m = 36: the null's minimum, another spread
        "small": _blobs(rng, centres, 5),  # m = 15 < 2 n
    }.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], arr)
    return paths


def test_evaluate_scores_gen_at_the_references_bandwidth(files, capsys):
    res = ev.evaluate(files["gen"], reference=files["ref"], cache_dir=None, null_draws=9)
    ref, gen = np.load(files["ref"]), np.load(files["gen"])
    assert res["sigma_from"] == "reference"
    assert res["sigma"] == pytest.approx(rk.default_bandwidth(ref))
    assert res["rke"] == pytest.approx(float(rk.rke_score(gen, res["sigma"])), rel=1e-6)
    assert res["novelty_null"]["draws"] == 9 and 0 < res["novelty_p"] <= 1
    assert ev.evaluate(files["gen"], cache_dir=None)["sigma_from"] == "generated"
    alone = ev.evaluate(files["gen"], reference=files["ref"], sigma=[2.0], cache_dir=None)
    assert alone["sigma_from"] == "given" and alone["sigma"] == 2.0
    # every mode listed holds files and names its sigma
    assert res["modes"] and all(m["files"] and m["sigma"] == res["sigma"] for m in res["modes"])
    assert all(m["files"] for m in res["novel_modes"])
    argv = ["evaluate", files["gen"], "--reference", files["ref"], "--no-cache", "--no-progress"]
    assert main([*argv, "--null-draws", "9", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "(from the reference: its default_bandwidth)" in out
    assert "over 9 reference splits; p = " in out and "mode 1 (sigma " in out


def test_evaluate_without_a_large_enough_reference_has_no_null(files, capsys):
    res = ev.evaluate(files["gen"], reference=files["small"], cache_dir=None)
    assert res["novelty_null"] is None and res["novelty_p"] is None
    argv = ["evaluate", files["gen"], "--reference", files["small"], "--no-cache", "--json"]
    assert main([*argv, "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["novelty_null"] is None and got["novelty_p"] is None
    assert main([*argv[:-1], "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (
        "novelty p: n/a (the null needs a reference of at least 2 n = 36 samples; it has 15)" in out
    )
    assert main([*argv[:-1], "--null-draws", "-1"]) == 2


def test_several_sigmas_label_every_printed_value(files, capsys):
    argv = ["evaluate", files["gen"], "--reference", files["ref"], "--sigma", "1", "4"]
    assert main([*argv, "--no-cache", "--no-progress", "--null-draws", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    for s in ("1", "4"):
        for what in ("RKE", "Vendi", "relative RKE"):
            assert any(ln.startswith(f"{what} (sigma {s})") for ln in out), (what, s)
    assert any(ln.startswith("novelty (KEN, sigma 1) = ") for ln in out)
    assert "novelty p: off (--null-draws 0)" in out


def test_report_sweep_is_log_log_with_the_reference_curve(files, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from rkekernels.cli import report

    keep: dict = {}
    res = ev.evaluate(files["gen"], reference=files["ref"], cache_dir=None, _keep=keep)
    assert keep["ref_sweep"]["sigma"] == keep["sweep"]["sigma"]
    figs = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda f, *a, **k: figs.append(f))
    report._sweep_plot(keep["sweep"], keep["sigma"], tmp_path / "s.png", keep["ref_sweep"])
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    ax = figs[0].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [ln.get_label() for ln in ax.lines]
    assert "reference RKE" in labels and any(lb.startswith("chosen sigma") for lb in labels)
    path = report.write_report(res, tmp_path / "rep", keep)
    text = path.read_text()
    assert "| mode | sigma | weight | files |" in text and "sigma_from: reference" in text
    assert "reference_sweep" in json.loads((tmp_path / "rep" / "results.json").read_text())


# --------------------------------------------------------------------------- score, compare


def test_score_prints_the_rule_that_chose_sigma(tmp_path, capsys):
    p = tmp_path / "x.npy"
    np.save(p, np.random.default_rng(0).normal(size=(30, 3)))
    assert main(["score", str(p)]) == 0
    s = rk.default_bandwidth(np.load(p))
    assert f"= {s:.6g}  (default_bandwidth: median distance / 2.5)" in capsys.readouterr().out


def test_compare_states_sigma_and_where_it_came_from(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 3)), 2.0 * rng.normal(size=(20, 3))
    assert rk.rke_scores([a, b]).sigma_from == "first"
    assert rk.rke_scores([a, b], reference=b).sigma_from == "reference"
    assert rk.rke_scores([a, b], 1.0).sigma_from == "given"
    pa, pb = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(pa, a)
    np.save(pb, b)
    assert main(["compare", str(pa), str(pb), "--reference", str(pb), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sigma_from"] == "reference" and res["sigma"] == pytest.approx(
        rk.default_bandwidth(b)
    )
    assert main(["compare", str(pa), str(pb)]) == 0
    assert f"(from the first file {pa}: its default_bandwidth)" in capsys.readouterr().out
