"""``torchrun ... -m rkekernels evaluate`` on 2 gloo ranks: rank 0's JSON equals one process's.

One spawn of 2 ranks (`benchmarks.common.spawn_ranks`, no group: the first command starts its
own from torchrun's environment variables, as under torchrun) runs every case through the
command line; the parent runs the same commands in one process and compares: the exact outputs
within 1e-10, the rff ones within their stated ``methods_error`` (and, being the same random
features, within 1e-5). 16-row tiles on both sides, so both ranks reduce tiles of their own.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch

from benchmarks.common import spawn_ranks
from rkekernels import _collectives as C
from rkekernels.cli import main
from rkekernels.evaluation import paths, ranks
from rkekernels.ops import scores_torch
from tests.conftest import write_images

pytestmark = pytest.mark.slow  # a spawned process group: a few seconds

N, M, D_EMB = 60, 150, 5
DRAWS = "9"
PROMPTS = ["a cat", "two dogs", "a red bird", "a boat", "the sea"]  # shares of 3 and 2
EXACT_TOL = 1e-10
#: keys whose value is not a score (or is the path that made one)
NOT_SCORES = {"cache", "methods", "methods_error", "encoder", "encoder_model", "sigma_from"}


def _data(root) -> dict:
    rng = np.random.default_rng(0)
    centres = np.repeat(np.eye(D_EMB) * 4.0, N // D_EMB, axis=0)
    np.save(root / "x.npy", (rng.normal(size=(N, D_EMB)) + centres).astype(np.float32))
    np.save(root / "y.npy", rng.normal(size=(M, D_EMB)).astype(np.float32))
    np.save(root / "t.npy", rng.normal(size=(N, 3)).astype(np.float32))
    write_images(root / "gen", 13, clusters=3, seed=1)  # 13: shares of 7 and 6
    write_images(root / "ref", 30, clusters=2, seed=2)
    bad = root / "bad"
    write_images(bad, 9, seed=3)
    (bad / "img_007.png").write_bytes(b"not a png")  # rank 1's: files 1, 3, 5, 7
    return {k: str(root / k) for k in ("x.npy", "y.npy", "t.npy", "gen", "ref", "bad")}


def _cases(f: dict, out: str) -> dict[str, list[str]]:
    """name -> command line (``out``: a folder name prefix for the reports and caches)."""
    emb = [f["x.npy"], "--reference", f["y.npy"], "--prompts", f["t.npy"], "--null-draws", DRAWS]
    img = [f["gen"], "--reference", f["ref"], "--encoder", "pixels", "--null-draws", DRAWS]
    return {
        "embeddings": [*emb, "--sigma", "1.5", "3", "--no-cache", "--out", f"{out}-report"],
        "images": [*img, "--cache", f"{out}-cache"],
        # the cache written just before; the unbiased interval (on rank 0)
        "images_again": [*img, "--cache", f"{out}-cache", "--unbiased"],
        "bad_image": [f["bad"], "--encoder", "pixels", "--no-cache"],
        "rff": [*emb, "--no-cache", "--out", f"{out}-rff-report"],
    }


def _force_rff(setattr_=setattr) -> None:
    """No time allowed to exact eigen paths: Vendi, modes, KEN and the sweep go rff at n = 60."""
    for name, value in [("EXACT_MIN_S", 0.0), ("EXACT_SHARE", 0.0), ("PROBE_N", 8),
                        ("APPROX_DIM", 32), ("SWEEP_DIM", 32),
                        ("approx_seconds", lambda *a: 0.0)]:  # fmt: skip
        setattr_(paths, name, value)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", *argv, "--json", "--no-progress"])
    return code, out.getvalue(), err.getvalue()


class _FakeText:
    """A text encoder without weights: the embedding of a prompt is a function of its text."""

    def encode(self, texts, progress=False):
        return [torch.tensor([float(len(s)), float(sum(map(ord, s)) % 97), 1.0]) for s in texts]


class _FakeEncoders:
    def __init__(self):
        self.opts = {"encoder": "pixels", "encoder_model": None, "text_model": None, "half": False}

    def text(self):
        return _FakeText()


def _rank(rank: int, world: int, files: dict, port: int, tmp: str) -> dict:
    scores_torch.BLOCK_ROWS = scores_torch.BLOCK_COLS = 16
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world,
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
    os.environ.update({k: str(v) for k, v in env.items()})
    cases = _cases(files, os.path.join(tmp, "ranks"))
    res: dict = {"embeddings": _cli(cases.pop("embeddings"))}  # starts and ends its own group
    res["group_left"] = torch.distributed.is_initialized()
    res["comm"] = dict(C.last_comm)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        rff = cases.pop("rff")
        for name, argv in cases.items():  # in the group above: session() leaves it alone
            res[name] = _cli(argv)
        _force_rff()
        res["rff"] = _cli(rff)
        res["rff_comm"] = dict(C.last_comm)
        stats: dict = {}
        res["prompts"] = ranks.embed_prompts(PROMPTS, _FakeEncoders(), None, False, stats)
        res["prompt_stats"] = stats
    finally:
        torch.distributed.destroy_process_group()
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(files, the 2 ranks' results, the one-process results of the same commands)."""
    root = tmp_path_factory.mktemp("ranks")
    files = _data(root)
    results = spawn_ranks(_rank, 2, (files, _free_port(), str(root)), init=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scores_torch, "BLOCK_ROWS", 16)
        mp.setattr(scores_torch, "BLOCK_COLS", 16)
        one = {name: _cli(argv) for name, argv in _cases(files, str(root / "one")).items()
               if name != "rff"}  # fmt: skip
        _force_rff(mp.setattr)
        one["rff"] = _cli(_cases(files, str(root / "one"))["rff"])
    return files, results, one


def _close(a, b, tol: float, where: str) -> None:
    """Every number of b within tol (relative) of a's, the same structure otherwise."""
    if isinstance(b, dict):
        assert set(a) == set(b), where
        for k in b:
            _close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _close(u, v, tol, f"{where}[{i}]")
    elif isinstance(b, float) and not isinstance(a, str):
        assert abs(a - b) <= tol * max(abs(b), 1e-300), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _json(run: tuple[int, str, str]) -> dict:
    code, out, err = run
    assert code == 0, err
    return json.loads(out)


def _quiet(run: tuple[int, str, str]) -> None:
    """A rank other than 0: nothing printed, success."""
    assert run == (0, "", ""), run


@pytest.mark.parametrize("case", ["embeddings", "images", "images_again"])
def test_exact_outputs_equal_one_process(runs, case):
    _, results, one = runs
    got, want = _json(results[0][case]), _json(one[case])
    _quiet(results[1][case])
    assert got["methods"] == want["methods"] and set(want["methods"].values()) == {"exact"}
    _close({k: v for k, v in got.items() if k not in NOT_SCORES},
           {k: v for k, v in want.items() if k not in NOT_SCORES}, EXACT_TOL, case)  # fmt: skip
    assert got["novelty_null"]["draws"] == int(DRAWS)
    assert got["cache"]["dir"] != want["cache"]["dir"] or got["cache"]["dir"] is None
    total = got["cache"]["cached"] + got["cache"]["encoded"]
    assert total == (0 if case == "embeddings" else 13 + 30)
    if case == "images":  # a fresh cache: both ranks encoded their shares
        assert got["cache"] == {**want["cache"], "dir": got["cache"]["dir"]}
        assert got["cache"]["encoded"] == 43


def test_the_group_is_started_from_the_environment_and_ended(runs):
    _, results, _ = runs
    assert [r["group_left"] for r in results] == [False, False]
    # embedding files are read by every rank: no features move, only sums and small tables
    comm = results[0]["comm"]
    assert comm["gathered_bytes"] == 0 and comm["reduced_bytes"] > 0


def test_report_written_by_rank_0_alone(runs, tmp_path):
    files, results, _ = runs
    report = os.path.join(os.path.dirname(files["gen"]), "ranks-report")
    assert os.path.isfile(os.path.join(report, "report.md"))
    assert sorted(os.listdir(report)) == sorted(
        os.listdir(os.path.join(os.path.dirname(files["gen"]), "one-report"))
    )
    with open(os.path.join(report, "results.json")) as fh:
        saved = json.load(fh)
    assert saved["rke"] == _json(results[0]["embeddings"])["rke"]


def test_rff_paths_within_their_stated_error(runs):
    _, results, one = runs
    got, want = _json(results[0]["rff"]), _json(one["rff"])
    _quiet(results[1]["rff"])
    assert got["methods"] == want["methods"]
    err = got["methods_error"]
    assert err == want["methods_error"]
    assert set(err) == {"vendi", "modes", "novelty", "sweep", "relative_rke"}
    assert err["vendi"] == 1.0 / math.sqrt(32)
    exact = {k: v for k, v in got.items() if k not in NOT_SCORES | {"vendi", "modes", "novelty",
             "novel_mass", "novel_modes", "novelty_null", "novelty_p", "relative_rke"}}  # fmt: skip
    # cross_rff runs whole on every rank (O((n + m) d dim), no pairs): one process's value
    _close(got["relative_rke"], want["relative_rke"], EXACT_TOL, "relative_rke")
    _close(exact, {k: want[k] for k in exact}, EXACT_TOL, "rff-exact")
    for key in ("vendi", "novelty", "novel_mass"):  # the contract, then the implementation
        _close(got[key], want[key], err.get(key, err["novelty"]), key)
        _close(got[key], want[key], 1e-5, key)
    for a, b in zip(got["modes"], want["modes"]):
        assert abs(a["weight"] - b["weight"]) <= err["modes"]
        assert abs(a["weight"] - b["weight"]) <= 1e-5
    assert [m["weight"] for m in got["novel_modes"]] == pytest.approx(
        [m["weight"] for m in want["novel_modes"]], rel=1e-5
    )
    _close(got["novelty_null"], want["novelty_null"], 1e-5, "null")  # draws split over ranks
    assert got["novelty_p"] == want["novelty_p"]
    # rff: D x D covariances all-reduced, (n, k) loadings gathered: never the (n, d) features
    assert results[0]["rff_comm"]["reduced_bytes"] >= 3 * 8 * 32 * 32


def test_bad_image_on_one_rank_fails_every_rank_with_its_message(runs):
    _, results, one = runs
    code, out, err = results[0]["bad_image"]
    assert (code, out) == (2, "")
    address = re.compile("0x[0-9a-f]+")  # PIL names the buffer it read
    assert "img_007.png" in err
    assert address.sub("", err) == address.sub("", one["bad_image"][2])  # one process's message
    assert results[1]["bad_image"] == (2, "", "")  # rank 1 (at fault) prints nothing


def test_prompts_embedded_in_shares_and_gathered_in_order(runs):
    _, results, _ = runs
    want = torch.stack(_FakeText().encode(PROMPTS))
    for r in results:
        assert torch.equal(r["prompts"], want)
        assert r["prompt_stats"]["cached_prompts"] == 0


def test_one_process_functions_unchanged():
    """Without a process group every wrapper is the one-process function."""
    assert ranks.world() == (0, 1) and not ranks.active()
    x = torch.randn(30, 4)
    s, _ = ranks.shared_sums(x, [1.0, 2.0])
    s1, _ = paths.shared_sums(x, [1.0, 2.0])
    assert torch.equal(s, s1)
