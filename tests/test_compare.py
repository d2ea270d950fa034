"""default_bandwidth (the median distance / 2.5), rke_scores at one shared bandwidth,
rke_sweep / plot_sweep, and `rkekernels compare` (issue 12, item 5)."""

import json

import numpy as np
import pytest
import torch

import rkekernels as rk
from rkekernels.cli import main


def _mixture(k, d, per, sep=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = sep * rng.normal(size=(k, d))
    x = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    return x, np.repeat(np.arange(k), per)


@pytest.mark.slow
@pytest.mark.parametrize("k, d", [(10, 16), (5, 4)])
def test_default_of_a_mixture_shared_with_one_cluster_separates_at_equal_n(k, d):
    x, y = _mixture(k, d, 200)
    n = 200
    mix = x[np.random.default_rng(1).choice(len(x), n, replace=False)]
    one = x[y == 0]
    s = rk.default_bandwidth(mix)  # one sigma, from the diverse set, shared
    r_mix, r_one = rk.rke_score(mix, s), rk.rke_score(one, s)
    assert r_mix >= 3.0 * r_one, (r_mix, r_one)
    # the median default at each set's own scale does not: both about 2.4
    med = [rk.rke_score(v, rk.median_bandwidth(v)) for v in (mix, one)]
    assert med[0] < 1.5 * med[1]


def test_default_is_used_when_sigma_is_none_and_is_exported():
    x, _ = _mixture(3, 5, 30)
    s = rk.default_bandwidth(x)
    assert s != rk.median_bandwidth(x)
    assert rk.rke_score(x) == rk.rke_score(x, s)
    t = np.eye(6)[np.repeat(np.arange(6), 15)]
    st = rk.default_bandwidth(t)
    assert rk.cond_rke_score(x, t) == rk.cond_rke_score(x, t, s, st)
    # one-hot prompts: different labels are far apart at the default (sigma = sqrt 2 / 2.5:
    # k^2 = e^-6.25 between labels; the median sqrt 2 would give k^2 = e^-1)
    assert st == pytest.approx(np.sqrt(2.0) / 2.5)
    assert rk.rke_score(t, st) == pytest.approx(6.0 / (1.0 + 5.0 * np.exp(-6.25)), rel=1e-9)
    assert rk.rke_score(t, st) > 5.9
    assert rk.rke_score(t, rk.median_bandwidth(t)) < 3.0


def test_default_degenerate_sets():
    assert rk.default_bandwidth(np.zeros((1, 3))) == 1.0
    assert rk.default_bandwidth(np.zeros((7, 3))) == 1.0
    x = np.array([[0.0], [1.0], [3.0]])  # the median distance 2 / 2.5
    assert rk.default_bandwidth(x) == pytest.approx(0.8, rel=1e-12)
    big = torch.tensor([[3e38], [-3e38], [0.0], [1e38]])
    assert np.isfinite(rk.default_bandwidth(big))


def test_rke_scores_share_one_bandwidth():
    rng = np.random.default_rng(0)
    tight, wide = rng.normal(size=(80, 3)), 3.0 * rng.normal(size=(80, 3))
    res = rk.rke_scores({"tight": tight, "wide": wide})
    assert res.sigma == rk.default_bandwidth(tight)
    assert res.scores == {
        "tight": pytest.approx(rk.rke_score(tight, res.sigma)),
        "wide": pytest.approx(rk.rke_score(wide, res.sigma)),
    }
    assert res.scores["wide"] > 3 * res.scores["tight"]
    assert rk.rke_scores([tight, wide], reference=1).sigma == rk.default_bandwidth(wide)
    assert rk.rke_scores([tight, wide], reference=wide).sigma == rk.default_bandwidth(wide)
    assert rk.rke_scores([tight, wide], 0.7).scores["1"] == pytest.approx(rk.rke_score(wide, 0.7))
    with pytest.raises(ValueError, match=r"set 'bad': x contains NaN"):
        rk.rke_scores({"ok": tight, "bad": np.full((3, 3), np.nan)}, 1.0)
    with pytest.raises(ValueError, match=r"reference 'nope' is not one of the sets"):
        rk.rke_scores({"ok": tight}, reference="nope")
    with pytest.raises(ValueError, match="sets is empty"):
        rk.rke_scores({})


def test_rke_scores_refuse_several_sigmas_and_mixed_widths():
    """Issue 23 A.7: sigma=[1.0, 2.0] blamed set '0' ("only length-1 arrays ..."), and sets of
    different widths were scored without complaint."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    for many in ([1.0, 2.0], np.array([1.0, 2.0]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"sigma must be one bandwidth .*rke_sweep"):
            rk.rke_scores({"0": x}, many)
    assert rk.rke_scores([x], torch.tensor([0.5])).sigma == 0.5  # one element is one sigma
    with pytest.raises(ValueError, match=r"same width d .*d=3: \['a', 'c'\]; d=2: \['b'\]"):
        rk.rke_scores({"a": x, "b": x[:, :2], "c": x}, 1.0)
    with pytest.raises(ValueError, match=r"reference has width d=2 but the sets have d=3"):
        rk.rke_scores({"a": x}, reference=x[:, :2])


def test_rke_sweep_and_plot(tmp_path):
    x, _ = _mixture(4, 3, 25)
    sw = rk.rke_sweep(x, num=9)
    assert len(sw.sigma) == len(sw.rke) == 9 and np.all(np.diff(sw.sigma) > 0)
    for s, r in zip(sw.sigma, sw.rke):
        assert r == pytest.approx(rk.rke_score(x, float(s)), rel=1e-10)
    assert np.all(np.diff(sw.rke) <= 1e-9)  # RKE falls as sigma grows
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    ax = rk.plot_sweep({"x": sw, "x/2": rk.rke_sweep(x / 2, sw.sigma)}, path)
    assert path.stat().st_size > 1000 and len(ax.lines) == 2


def test_cli_compare(tmp_path, capsys):
    x, _ = _mixture(4, 3, 25)
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, x)
    np.save(b, 2 * x)
    assert main(["compare", str(a), str(b), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sigma"] == pytest.approx(rk.default_bandwidth(x))
    assert res["rke"][str(b)] == pytest.approx(rk.rke_score(2 * x, res["sigma"]))
    assert main(["compare", str(a), str(b), "--sigma", "2.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sigma"] == 2.0
    plot = tmp_path / "c.png"
    assert main(["compare", str(a), str(b), "--sweep", "5", "--plot", str(plot), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["sigma"]) == 5 and len(res["rke"][str(a)]) == 5 and plot.exists()
    assert main(["compare", str(a), str(b)]) == 0
    assert "the scores compare" in capsys.readouterr().out
    np.save(tmp_path / "c.npy", np.ones((4, 7)))
    assert main(["compare", str(a), str(tmp_path / "c.npy")]) == 2
    err = capsys.readouterr().err
    assert "different widths" in err and len(err.strip().splitlines()) == 1
