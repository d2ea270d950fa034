"""Progress over the tiles of the O(n^2) pass (issue 23, A2.11): the callback of the torch tile
loop, its route from the public scores (`ops.pair_sums.reporting`), and ``score --progress``."""

import io
import itertools
import json

import numpy as np
import pytest
import torch

import rkekernels
from rkekernels.cli import _progress, main
from rkekernels.ops import pair_sums, score_and_grad, scores_torch

N, D, M = 37, 4, 3
BR, BC = 8, 5  # rows and columns blocks differ: the tiles are not all square


def _entries(n: int, br: int) -> int:
    """Kernel entries of the upper-triangle tiles, counted without `tiles`: row block
    [i0, i0 + br) reaches the columns [i0, n)."""
    total, i0 = 0, 0
    while i0 < n:
        total += (min(i0 + br, n) - i0) * (n - i0)
        i0 += br
    return total


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done, total):
        self.calls.append((done, total))

    def check(self, total: int) -> None:
        done = [c[0] for c in self.calls]
        assert self.calls[0] == (0, total) and self.calls[-1] == (total, total)
        assert all(t == total for _, t in self.calls)
        assert all(a < b for a, b in itertools.pairwise(done))  # one call per tile, each adds pairs


@pytest.fixture()
def xt():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    t = torch.randn(N, M, generator=g, dtype=torch.float64)
    return x - x.mean(0), t - t.mean(0)


def test_forward_sums_counts_the_pairs_it_computes(xt, monkeypatch):
    x, t = xt
    computed = []
    block_sums = scores_torch.block_sums

    def spy(out, weight, xa, na, xb, nb, *args, **kw):
        computed.append(xa.shape[0] * xb.shape[0])
        return block_sums(out, weight, xa, na, xb, nb, *args, **kw)

    monkeypatch.setattr(scores_torch, "block_sums", spy)
    rec = _Recorder()
    got = scores_torch.forward_sums(
        x, t, (1.0, 0.25), 2.0, block_rows=BR, block_cols=BC, progress=rec
    )
    total = _entries(N, BR)
    rec.check(total)
    assert sum(computed) == total == scores_torch.tile_pairs(N, BR, BC)
    steps = [b[0] - a[0] for a, b in zip(rec.calls, rec.calls[1:])]
    assert steps == computed  # each call adds exactly the tile just computed
    # the triangle's tiles cover every ordered pair once counted twice off the diagonal squares
    diag = sum(min(BR, N - i0) ** 2 for i0 in range(0, N, BR))
    assert 2 * total - diag == N * N
    computed.clear()
    plain = scores_torch.forward_sums(x, t, (1.0, 0.25), 2.0, block_rows=BR, block_cols=BC)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)  # reporting changes nothing


def test_shards_split_the_total(xt):
    x, _ = xt
    totals = []
    for rank in range(3):
        rec = _Recorder()
        scores_torch.forward_sums(
            x, None, (1.0,), None, block_rows=BR, block_cols=BC, shard=(rank, 3), progress=rec
        )
        rec.check(scores_torch.tile_pairs(N, BR, BC, shard=(rank, 3)))
        totals.append(rec.calls[-1][1])
    assert sum(totals) == _entries(N, BR)


def test_fused_sum_and_grad_reports_the_same_tiles(xt):
    x, _ = xt
    a, b = _Recorder(), _Recorder()
    fx, g = score_and_grad.sum_and_grad(x, 0.5, block_rows=BR, block_cols=BC, progress=a)
    scores_torch.forward_sums(x, None, (0.5,), None, block_rows=BR, block_cols=BC, progress=b)
    a.check(_entries(N, BR))
    assert a.calls == b.calls
    fx0, g0 = score_and_grad.sum_and_grad(x, 0.5, block_rows=BR, block_cols=BC)
    assert torch.equal(fx, fx0) and torch.equal(g, g0)


@pytest.mark.parametrize("grad", [False, True])  # True: the fused forward + gradient path
def test_public_scores_report_through_reporting(xt, monkeypatch, grad):
    monkeypatch.setattr(scores_torch, "BLOCK_ROWS", BR)
    monkeypatch.setattr(scores_torch, "BLOCK_COLS", BC)
    x, t = (v.clone().requires_grad_(grad) for v in xt)
    total = _entries(N, BR)
    calls = [
        lambda: rkekernels.rke_score(x, 1.0, backend="torch"),
        lambda: rkekernels.cond_rke_score(x, t, 1.0, 2.0, backend="torch"),
        lambda: rkekernels.rke_entropies(x, t, [1.0, 2.0], 2.0, backend="torch"),
        lambda: rkekernels.vendi_score(x, 2.0, 1.0, method="exact"),
    ]
    for f in calls:
        rec = _Recorder()
        with pair_sums.reporting(rec):
            val = f()
        rec.check(total)
        if grad:  # the backward pass reports nothing (and works as before)
            (val[0] if isinstance(val, tuple) else val).sum().backward()
        seen = len(rec.calls)
        inner = _Recorder()
        with pair_sums.reporting(inner), pair_sums.reporting(None):  # None inside: silent
            f()
        f()  # outside any block: nothing reported
        assert inner.calls == [] and len(rec.calls) == seen


def test_plain_lines_estimate_from_the_rate():
    ticks = iter([100.0, 104.0, 105.0, 108.0, 110.0])
    out = io.StringIO()
    p = _progress.PairProgress(
        "scoring", stream=out, bar=False, every=3.0, clock=lambda: next(ticks)
    )
    for done in (0, 2_000_000, 2_500_000, 4_000_000, 5_000_000):  # at 100, 104, 105, 108, 110 s
        p(done, 5_000_000)
    lines = out.getvalue().splitlines()
    # 105 s is within 3 s of the last line: skipped; 2M pairs in 4 s: 500k/s, 3M left -> 6 s
    assert lines == [
        "scoring: 40.0% of 5.00M pairs, 500k pairs/s, 0:00:04 so far, about 0:00:06 left",
        "scoring: 80.0% of 5.00M pairs, 500k pairs/s, 0:00:08 so far, about 0:00:02 left",
        "scoring: 100% of 5.00M pairs in 0:00:10 (500k pairs/s)",
    ]


def _write(tmp_path, n=N):
    x = np.random.default_rng(1).normal(size=(n, D))
    p = tmp_path / "x.npy"
    np.save(p, x)
    return p, x


def test_cli_score_progress_lines_on_stderr(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scores_torch, "BLOCK_ROWS", BR)
    monkeypatch.setattr(scores_torch, "BLOCK_COLS", BC)
    monkeypatch.setattr(_progress, "LINE_EVERY_S", 0.0)  # a line per tile
    p, x = _write(tmp_path)
    code = main(["score", str(p), "--sigma", "1", "--backend", "torch", "--progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out)["rke"] == pytest.approx(float(rkekernels.rke_score(x, 1.0)), rel=1e-12)
    lines = err.splitlines()
    total = _entries(N, BR)
    tiles = sum(1 for _ in scores_torch.tiles(N, BR, BC))
    assert len(lines) == tiles and all(line.startswith(f"scoring n={N}: ") for line in lines)
    assert all("pairs/s" in line and "left" in line for line in lines[:-1])
    assert f"100% of {total} pairs in " in lines[-1]  # 825: below 1,000, no prefix
    pct = [float(line.split(": ")[1].split("%")[0]) for line in lines]
    assert pct == sorted(pct) and pct[-1] == 100.0
    # off (explicitly, and by default below PROGRESS_MIN_N rows): nothing on stderr
    for flag in (["--no-progress"], []):
        assert main(["score", str(p), "--sigma", "1", "--backend", "torch", *flag]) == 0
        assert capsys.readouterr().err == ""


def test_cli_score_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_progress, "_is_terminal", lambda stream: True)
    p, _ = _write(tmp_path)
    t = tmp_path / "t.npy"
    np.save(t, np.random.default_rng(2).normal(size=(N, M)))
    code = main(["score", str(p), "--cond", str(t), "--backend", "torch", "--progress"])
    out, err = capsys.readouterr()
    assert code == 0 and "cond RKE" in out
    assert f"scoring n={N}" in err and "pair/s" in err  # tqdm's bar, counting pairs
    assert "pairs/s" not in err  # not the plain lines
