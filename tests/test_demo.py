"""The demo's claim on a small setting: guidance covers more modes, precision kept, PNG written."""

import pytest
import torch

from rkekernels.cli import main
from rkekernels.demo import DemoConfig, format_report, run
from rkekernels.toy import PromptWorld


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "sub" / "demo.png"
    return run(samples=8, prompts=4, steps=24, seed=1, out=str(out), progress=False), out


@pytest.mark.slow
def test_guided_covers_more_modes_at_kept_precision(small):
    res, _ = small
    base = res.overall["unguided"]
    assert base.true_modes == 20
    for m in ("guided", "guided_batch"):
        o = res.overall[m]
        assert o.covered >= base.covered + 2, (m, o.covered, base.covered)
        assert o.precision >= 0.9 * base.precision, (m, o.precision, base.precision)
        assert o.rke > base.rke and o.cond_rke > base.cond_rke
        assert res.verdicts[m][0] and res.verdicts[m][1].startswith("OK")
        # the modes come back per prompt: covered counts add up, each within its true count
        assert sum(s.covered for s in res.per_prompt[m]) == o.covered
        assert all(0 < s.covered <= s.true_modes == 5 for s in res.per_prompt[m])
    assert res.ok
    # unguided sampling with the exact denoiser is precise, and the dominant mode dominates
    assert base.precision > 0.95  # (a 2-D Gaussian puts 1.1% of its mass beyond 3 std)
    world = PromptWorld(4, 5, dominant=res.config.dominant)
    for p in range(4):
        x = res.samples["unguided"][p]
        assert x.shape == (8, 2)
        # unguided: the dominant mode (index 0 of the prompt's mixture) holds most samples
        assert int(world.mixture(p).mode_counts(x).argmax()) == 0


def test_figure_written(small):
    res, out = small
    assert res.figure == str(out.resolve())
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_table(small):
    res, _ = small
    text = format_report(res)
    for needle in (
        "prompt 0",
        "prompt 3",
        "overall (4 prompts x 8 samples)",
        "cond RKE",
        "overhead",
        "SPARKE one by one: OK",
        "SPARKE batch=4: OK",
        f"figure: {res.figure}",
    ):
        assert needle in text, needle
    row = next(line for line in text.splitlines() if line.strip().startswith("unguided  "))
    assert f"{res.per_prompt['unguided'][0].covered}/5" in row


def test_deterministic_and_says_when_not_met(tmp_path):
    kw = dict(samples=4, prompts=2, steps=12, out="", progress=False, seed=3)
    a, b = run(**kw), run(**kw)
    for m in a.samples:
        for p in range(2):
            torch.testing.assert_close(a.samples[m][p], b.samples[m][p], rtol=0, atol=0)
    # scale 0: guidance does nothing, so the demo must say its claim is not met
    res = run(DemoConfig(**kw), scale=0.0)
    for p in range(2):
        torch.testing.assert_close(res.samples["guided"][p], res.samples["unguided"][p])
    assert not res.ok
    assert "NOT MET with these settings" in res.verdicts["guided"][1]
    assert "not clearly more modes (+0" in res.verdicts["guided"][1]


def test_high_dimensional_variant():
    res = run(samples=8, prompts=4, steps=24, dim=16, out="", progress=False)
    x = res.samples["guided"][0]
    assert x.shape == (8, 16) and torch.isfinite(x).all()
    base = res.overall["unguided"]
    for m in ("guided", "guided_batch"):
        assert res.overall[m].covered >= base.covered + 2
        assert res.overall[m].precision >= 0.9 * base.precision
    assert res.ok


def test_log1p_objective_is_the_faded_plain_direction():
    from rkekernels import DiversityGuidance

    kw = dict(sigma=0.8, sigma_cond=0.5, normalize=False)
    plain, marginal = DiversityGuidance(**kw), DiversityGuidance(objective="log1p", **kw)
    bank = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    plain.commit(bank, cond)
    marginal.commit(bank, cond)
    z = torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).double()
    y = cond[:3].double() + 0.1
    a, b = plain.grad(z, y), marginal.grad(z, y)
    s = a.log_s.exp()
    torch.testing.assert_close(b.grad, a.grad * (2 * s / (1 + 2 * s))[:, None])
    torch.testing.assert_close(b.log_s, a.log_s)
    # far from everything in the bank (or only unrelated prompts): the push fades to ~0
    far = marginal.grad(z + 50.0, y).grad
    assert float(far.abs().max()) < 1e-12 < float(plain.grad(z + 50.0, y).grad.abs().max())
    with pytest.raises(ValueError, match="objective must be one of"):
        DiversityGuidance(sigma=1.0, objective="inverse")


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "d.png"
    argv = ["demo", "--samples", "3", "--prompts", "1", "--steps", "10", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "overall (1 prompts x 3 samples)" in text and f"figure: {out.resolve()}" in text
    assert out.is_file()
    assert main(["demo", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rkekernels: error: samples must be an int >= 1, got 0"
    assert main(["demo", "--start", "0.8", "--stop", "0.2"]) == 2
    assert "need 0 <= start <= stop <= 1" in capsys.readouterr().err
