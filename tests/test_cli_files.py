"""Files, folders and streams of the command line (issue 23 A.9, A2): ``--out`` never deletes or
overwrites what the command did not write, caches are checked, odd files give one line."""

import json
import os
import re

import numpy as np
import pytest

from rkekernels.cli import main
from tests.conftest import write_images


def _run(capsys, *argv):
    code = main([*map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _evaluate(capsys, gen, *argv):
    return _run(capsys, "evaluate", gen, "--encoder", "pixels", "--no-progress", *argv)


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def gen(tmp_path):
    write_images(tmp_path / "g", 6, clusters=2, size=8)
    return tmp_path / "g"


def test_out_keeps_what_it_did_not_write(gen, tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "thesis.tex").write_text("my thesis")
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", out)
    _one_line_error(code, err, "not empty", str(out))
    assert os.listdir(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "my thesis"
    # an existing file, GEN itself: refused before any work, nothing touched
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", f)
    _one_line_error(code, err, "is a file")
    assert f.read_text() == "keep"
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", gen)
    _one_line_error(code, err, "is the input")
    assert sorted(os.listdir(gen)) == [f"img_{i:03d}.png" for i in range(6)]


def test_out_rewrites_its_own_report_only(gen, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", out, "--reference", gen)
    assert code == 0, err
    assert "novel_modes.png" in os.listdir(out)
    (out / "mine.txt").write_text("mine")  # a user's file beside an earlier report
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", out)
    assert code == 0, err
    mine = [".rkekernels-report", "crowded.png", "mine.txt", "modes.png", "report.md"]
    assert sorted(os.listdir(out)) == sorted([*mine, "results.json", "sweep.png"])
    # the earlier report's novel_modes.png is gone, mine.txt stays, no temporary files
    marker = json.loads((out / ".rkekernels-report").read_text())
    assert "mine.txt" not in marker["files"] and "report.md" in marker["files"]
    # `--out .`: the current folder is not empty and holds no report: one line
    monkeypatch.chdir(tmp_path)
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", ".")
    _one_line_error(code, err, "not empty")
    # an empty current folder works
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", ".")
    assert code == 0, err
    assert "report.md" in os.listdir(".")


def test_out_not_writable_is_checked_before_encoding(gen, tmp_path, capsys, monkeypatch):
    from rkekernels.adapters import encoders

    def boom(*a, **k):
        raise AssertionError("encoded although --out cannot be written")

    monkeypatch.setattr(encoders, "load_encoder", boom)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _evaluate(capsys, gen, "--no-cache", "--out", blocker / "sub" / "rep")
    _one_line_error(code, err, "is a file, not a folder")
    assert sorted(os.listdir(tmp_path)) == ["file", "g"]


def test_out_failing_late_prints_the_scores_and_leaves_nothing(gen, tmp_path, capsys, monkeypatch):
    from rkekernels.cli import report

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "_sweep_plot", full)
    code, out, err = _evaluate(capsys, gen, "--no-cache", "--out", tmp_path / "rep", "--json")
    _one_line_error(code, err, "No space left")
    assert json.loads(out)["n"] == 6  # the scores are printed anyway
    assert sorted(os.listdir(tmp_path)) == ["g"]  # no half report, no .old folder


def test_non_utf8_file_name_in_the_report(tmp_path, capsys):
    g = tmp_path / "g"
    write_images(g, 4, clusters=2, size=8)
    os.rename(g / "img_000.png", os.fsencode(g) + b"/caf\xe9.png")
    code, out, err = _evaluate(capsys, g, "--no-cache", "--out", tmp_path / "rep")
    assert code == 0, err
    assert "n = 4" in out  # printed, a name that is not UTF-8 included, without a traceback
    text = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "caf\\udce9.png" in text


def test_report_inside_gen_and_hidden_files_are_not_scored(gen, capsys):
    code, out, err = _evaluate(capsys, gen, "--no-cache", "--out", gen / "report", "--json")
    assert code == 0, err
    first = json.loads(out)
    write_images(gen / ".thumbs", 2, size=8)
    write_images(gen / "sub", 1, size=8, seed=3)
    (gen / ".hidden.png").write_bytes((gen / "img_000.png").read_bytes())
    code, out, err = _evaluate(capsys, gen, "--no-cache", "--out", gen / "report", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert first["n"] == 6 and again["n"] == 7  # sub/img_000.png only
    files = {f for m in again["modes"] for f in m["files"]}
    assert "sub/img_000.png" in files and not any(f.startswith(("report", ".")) for f in files)


def _evaluate_json(capsys, gen, *argv):
    code, out, err = _evaluate(capsys, gen, "--json", *argv)
    assert code == 0, err
    return json.loads(out), err


def test_cache_is_keyed_on_content_not_name_size_time(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_images(a, 4, clusters=1, size=8, seed=0)  # one colour: RKE near 1
    write_images(b, 4, clusters=4, size=8, seed=1)  # four colours: RKE near 4
    cache = tmp_path / "cache"
    first, _ = _evaluate_json(capsys, a, "--cache", cache, "--sigma", "3")
    st = {f.name: f.stat() for f in a.iterdir()}
    for f in b.iterdir():  # `cp -p`: other images, same names, sizes made equal, same times
        data = f.read_bytes()
        (a / f.name).write_bytes(data)
        os.utime(a / f.name, ns=(st[f.name].st_atime_ns, st[f.name].st_mtime_ns))
    fresh, _ = _evaluate_json(capsys, b, "--no-cache", "--sigma", "3")
    second, _ = _evaluate_json(capsys, a, "--cache", cache, "--sigma", "3")
    assert second["cache"]["encoded"] == 4
    assert second["rke"] == pytest.approx(fresh["rke"], rel=1e-6)
    assert abs(second["rke"] - first["rke"]) > 1.0


@pytest.mark.parametrize(
    "damage",
    ["short vector", "list", "1-tuple", "nan vector", "garbage bytes", "other shape"],
)
def test_damaged_cache_is_rebuilt_not_trusted(gen, tmp_path, capsys, damage):
    import torch

    cache = tmp_path / "cache"
    first, _ = _evaluate_json(capsys, gen, "--cache", cache)
    (file,) = list(cache.rglob("*.pt"))
    obj = torch.load(file, weights_only=True)
    if damage == "short vector":
        obj["vectors"] = obj["vectors"][:, :-1]
    elif damage == "list":
        obj = [obj]
    elif damage == "1-tuple":
        obj = (obj["vectors"],)
    elif damage == "nan vector":
        obj["vectors"][2, 0] = float("nan")
    elif damage == "other shape":
        obj["vectors"] = obj["vectors"][:3]
    if damage == "garbage bytes":
        file.write_bytes(b"not a cache")
    else:
        torch.save(obj, file)
    second, err = _evaluate_json(capsys, gen, "--cache", cache)
    assert second["cache"]["encoded"] == 6 and second["rke"] == first["rke"], err
    third, _ = _evaluate_json(capsys, gen, "--cache", cache)  # rebuilt
    assert third["cache"]["cached"] == 6


def test_cache_that_cannot_be_written_warns_once(gen, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    ref = tmp_path / "ref"
    write_images(ref, 3, size=8, seed=5)
    res, err = _evaluate_json(capsys, gen, "--cache", blocker, "--reference", ref)
    assert res["n"] == 6 and res["cache"]["encoded"] == 9
    assert err.count("warning") == 1 and "cannot write the embedding cache" in err, err
    assert blocker.read_text() == "x"
    # a read-only folder (root ignores chmod: simulate the failure)
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    res, err = _evaluate_json(capsys, gen, "--cache", tmp_path / "ro", "--reference", ref)
    assert res["n"] == 6 and err.count("warning") == 1 and "Permission denied" in err


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) and holds no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name,data,needle",
    [
        ("big.png", _png_header(10_000, 10_000), "too many pixels"),  # past the warning limit
        ("bomb.png", _png_header(40_000, 40_000), "too many pixels"),  # past PIL's hard limit
        ("broken.png", b"\x89PNG broken", "cannot read it as an image"),
    ],
    ids=["10k-square", "bomb", "broken"],
)
def test_bad_images_are_one_line_before_the_encoder_loads(
    gen, capsys, monkeypatch, name, data, needle
):
    from rkekernels.adapters import encoders

    def boom(*a, **k):
        raise AssertionError("the encoder was loaded before the images were checked")

    monkeypatch.setattr(encoders, "load_encoder", boom)
    (gen / name).write_bytes(data)
    code, _, err = _evaluate(capsys, gen, "--no-cache")
    _one_line_error(code, err, name, needle)


def test_compare_plot_paths(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(8, 2)))
    base = ["compare", tmp_path / "a.npy", "--sweep", "3", "--json", "--plot"]
    (tmp_path / "README.png").write_bytes(b"keep")
    code, _, err = _run(capsys, *base, tmp_path / "README")
    _one_line_error(code, err, "--plot", "README.png")  # refused: the suffix is required
    assert (tmp_path / "README.png").read_bytes() == b"keep"
    code, _, err = _run(capsys, *base, tmp_path)  # a folder: sweep.png inside it
    assert code == 0, err
    assert (tmp_path / "sweep.png").stat().st_size > 1000 and "sweep.png" in err
    code, _, err = _run(capsys, *base, tmp_path / "new" / "deep" / "s.svg")  # parents created
    assert code == 0, err
    assert (tmp_path / "new" / "deep" / "s.svg").is_file()
    code, _, err = _run(capsys, *base, tmp_path / "a.npy" / "s.png")
    _one_line_error(code, err, "is a file, not a folder")


def test_demo_out_paths(tmp_path, capsys, monkeypatch):
    from rkekernels import demo

    ran = []
    monkeypatch.setattr(demo, "run", lambda cfg: ran.append(cfg.out) or 1 / 0)
    (tmp_path / "figs").mkdir()
    (tmp_path / "d.png").mkdir()
    for given, used in (("figs", "figs/demo.png"), ("d.png", "d.png/demo.png")):
        with pytest.raises(ZeroDivisionError):
            main(["demo", "--out", str(tmp_path / given)])
        assert ran.pop() == str(tmp_path / used)  # written where it says, inside the folder
    code, _, err = _run(capsys, "demo", "--out", tmp_path / "fig")
    _one_line_error(code, err, "--out", "fig.png")
    assert not ran  # refused before the run


def _cli(*argv, **kw):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "rkekernels", *map(str, argv)]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, **kw)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_and_closed_pipe_on_stdout(tmp_path):
    import subprocess

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(20, 3)))
    # both commands run at once (each is mostly the interpreter's start-up)
    with open("/dev/full", "w") as full:
        p = _cli("score", tmp_path / "x.npy", "--json", stdout=full)
    q = _cli("score", tmp_path / "x.npy", "--json", stdout=subprocess.PIPE)
    q.stdout.close()  # the reader is gone before anything is written
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "cannot write the output" in err and "No space left" in err
    _, err = q.communicate(timeout=120)
    assert q.returncode == 141 and err.decode() == ""


def test_npz_declared_size_is_checked_before_inflating(tmp_path, capsys, monkeypatch):
    p = tmp_path / "z.npz"
    np.savez_compressed(p, x=np.zeros((4096, 64)), y=np.ones((3, 2)))  # 2 MiB of zeros in x
    assert p.stat().st_size < 20_000
    inflated = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(
        np.lib.npyio.NpzFile, "__getitem__", lambda s, k: inflated.append(k) or real(s, k)
    )
    code, _, err = _run(capsys, "score", p, "--key", "x", "--max-bytes", "1M")
    _one_line_error(code, err, "z.npz", "'x'", "--max-bytes")
    assert inflated == []  # refused from the zip header, nothing inflated
    code, out, err = _run(capsys, "score", p, "--key", "y", "--max-bytes", "1M", "--json")
    assert code == 0, err
    assert inflated == ["y"]  # only the array asked for
    code, out, err = _run(capsys, "score", p, "--key", "x", "--max-bytes", "4M", "--json")
    assert code == 0 and json.loads(out)["rke"] == pytest.approx(1.0), err
    code, _, err = _run(capsys, "compare", p, "--key", "x", "--max-bytes", "1M")
    _one_line_error(code, err, "--max-bytes")
    code, _, err = _evaluate(capsys, p, "--key", "x", "--max-bytes", "1M")
    _one_line_error(code, err, "--max-bytes")
    for bad in ("lots", "0", "0.0G", "nanM"):
        code, _, err = _run(capsys, "score", p, "--max-bytes", bad)
        _one_line_error(code, err, "not a size > 0", repr(bad))


def test_meta_tensor_and_0d_array(tmp_path, capsys):
    import torch

    torch.save(torch.empty(3, 2, device="meta"), tmp_path / "m.pt")
    code, _, err = _run(capsys, "score", tmp_path / "m.pt")
    _one_line_error(code, err, "m.pt", "meta tensor")
    np.save(tmp_path / "z.npy", np.float64(3.0))
    code, _, err = _run(capsys, "score", tmp_path / "z.npy")
    _one_line_error(code, err, "got shape ()")


def test_unbiased_changes_the_intervals_not_the_scores(tmp_path):
    from rkekernels import cond_rke_score, rke_score
    from rkekernels.evaluation import evaluate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    t = np.repeat(np.eye(3), 10, axis=0)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    kw = dict(sigma=[1.0], sigma_t=0.5, cache_dir=None)
    plain = evaluate(str(tmp_path / "x.npy"), prompts=str(tmp_path / "t.npy"), **kw)
    unb = evaluate(str(tmp_path / "x.npy"), prompts=str(tmp_path / "t.npy"), unbiased=True, **kw)
    plug = cond_rke_score(x, t, 1.0, 0.5)
    for res in (plain, unb):  # the docstring's plug-in scores, whatever the interval
        assert res["rke"] == pytest.approx(rke_score(x, 1.0), rel=1e-6)
        assert res["cond_rke"] == pytest.approx(plug, rel=1e-6)
    assert unb["cond_rke_interval"]["unbiased"] is True
    assert unb["cond_rke_interval"]["estimate"] != pytest.approx(plug, rel=1e-3)
    assert plain["cond_rke_interval"]["estimate"] == pytest.approx(plug, rel=1e-6)


@pytest.mark.parametrize("network", ["refused", "hangs", "offline", "no transformers"])
def test_default_encoder_without_weights_is_one_line_before_loading(
    gen, tmp_path, capsys, monkeypatch, network
):
    import importlib.util
    import socket
    import time

    from rkekernels.adapters import encoders
    from rkekernels.evaluation import embeddings

    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(embeddings, "HUB_TIMEOUT_S", 0.3)
    calls = []

    def connect(addr, timeout=None):
        calls.append((addr, timeout))
        if network == "hangs":
            time.sleep(3)
        raise OSError("no network")

    def boom(*a, **k):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(encoders, "load_encoder", boom)
    if network == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if network == "no transformers":
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a)
        )
    t0 = time.perf_counter()
    code, _, err = _run(capsys, "evaluate", gen, "--no-cache", "--no-progress")
    assert time.perf_counter() - t0 < 10.0  # the bound (no retries: `calls` below)
    _one_line_error(code, err, "--encoder pixels")
    if network == "no transformers":
        assert "pip install -e '.[encoders]'" in err and "rkekernels[encoders]" in err
        assert calls == []
    elif network == "offline":
        assert "hf download facebook/dinov2-large" in err and calls == []
    else:
        assert "not reachable" in err
        assert len(calls) == 1 and calls[0][1] <= 3  # one attempt, no retries


def test_every_help_shows_every_default():
    import argparse

    from rkekernels.cli import _parser

    top = _parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for name, p in sub.choices.items():
        fmt = p._get_formatter()
        for action in p._actions:
            d = action.default
            if not action.option_strings or d in (None, False, argparse.SUPPRESS):
                continue
            shown = fmt._expand_help(action)
            said = re.search(
                rf"default:? {re.escape(str(d))}\b|{re.escape(str(d))} \(default\)", shown
            )
            assert said, f"{name} {action.option_strings[0]}: {shown!r}"
            assert str(d) in " ".join(p.format_help().split())
            checked += 1
    assert checked >= 25
    ev = " ".join(sub.choices["evaluate"].format_help().split())
    for opt in ("--top TOP", "--per-mode PER_MODE", "--batch-size BATCH_SIZE"):
        assert opt in ev
    assert "images per encoder batch (default: 32)" in ev and "(default: 8)" in ev


def test_non_finite_input_names_the_first_bad_row(tmp_path, capsys):
    x = np.ones((10, 3))
    x[7, 2] = np.inf
    x[9, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    code, _, err = _run(capsys, "score", tmp_path / "x.npy")
    _one_line_error(code, err, "2 non-finite entries, first at row 7")
