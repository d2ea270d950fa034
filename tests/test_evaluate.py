"""`rkekernels evaluate` end to end on a few 16x16 images and tiny random-weight encoders."""

import json
import os

import numpy as np
import pytest
import torch

import rkekernels
from rkekernels import evaluation
from rkekernels.adapters import encoders
from rkekernels.cli import main
from tests.conftest import write_images

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    gen = write_images(root / "gen", 12, clusters=3, seed=0, size=[16, 20, 12])
    write_images(root / "ref", 10, clusters=2, seed=0)
    prompts = ["a red cat", "a blue dog", "a green bird"]
    (root / "prompts.txt").write_text("\n".join(prompts[i % 3] for i in range(12)) + "\n")
    rows = [f"{os.path.basename(p)},{prompts[i % 3]}" for i, p in enumerate(gen)]
    (root / "prompts.csv").write_text("file,prompt\n" + "\n".join(reversed(rows)) + "\n")
    return root


def _run(capsys, *argv):
    code = main(["evaluate", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv):
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_images_prompts_reference_json(sets, tiny_encoder_dirs, tmp_path, capsys):
    d = tiny_encoder_dirs
    cache = tmp_path / "cache"
    common = ["--encoder-model", d["dinov2"], "--text-model", d["clip"], "--cache", cache]
    res = _json(
        capsys,
        sets / "gen",
        "--reference",
        sets / "ref",
        "--prompts",
        sets / "prompts.txt",
        *common,
    )
    for k in (
        "n",
        "sigma",
        "encoder",
        "rke",
        "vendi",
        "cond_rke",
        "cond_vendi",
        "novelty",
        "novel_modes",
        "relative_rke",
        "modes",
    ):
        assert k in res, k
    assert res["n"] == 12 and res["encoder"] == "dinov2" and isinstance(res["sigma"], float)
    assert res["cache"]["encoded"] == 22 and res["cache"]["cached"] == 0
    # the same numbers from the library on independently computed features
    enc = encoders.load_encoder("dinov2", model=d["dinov2"])
    paths = sorted((sets / "gen").glob("*.png"))
    x = enc.encode(paths)
    y = enc.encode(sorted((sets / "ref").glob("*.png")))
    s = res["sigma"]  # REF's default bandwidth: runs against one reference share it
    assert res["sigma_from"] == "reference"
    assert s == pytest.approx(rkekernels.default_bandwidth(y), rel=1e-5)
    assert res["rke"] == pytest.approx(float(rkekernels.rke_score(x, s)), rel=1e-5)
    assert res["vendi"] == pytest.approx(float(rkekernels.vendi_score(x, 1.0, s)), rel=1e-5)
    assert res["relative_rke"] == pytest.approx(float(evaluation.relative_rke(x, y, s)), rel=1e-5)
    assert res["novelty"] == pytest.approx(
        evaluation.ken_novelty(x, y, s).score, rel=1e-4, abs=1e-7
    )
    lo, hi = res["rke_interval"]["low"], res["rke_interval"]["high"]
    assert lo < res["rke"] < hi
    names = {p.name for p in paths}
    assert all(set(m["files"]) <= names and 0 <= m["weight"] <= 1 for m in res["modes"])
    crowd = [c["s"] for c in res["most_crowded"]]
    assert all(c["file"] in names for c in res["most_crowded"]) and crowd == sorted(crowd)[::-1]
    assert 1.0 <= res["least_crowded"][0]["s"] <= crowd[-1]
    # CSV rows in another order, matched by file name: the same conditional scores
    # (at the same sigma: without --reference GEN's own default would be used)
    csv = _json(capsys, sets / "gen", "--prompts", sets / "prompts.csv", "--sigma", str(s), *common)
    assert csv["cond_rke"] == pytest.approx(res["cond_rke"], rel=1e-6)
    assert csv["cache"]["encoded"] == 0  # GEN came from the cache
    # several bandwidths give lists
    many = _json(capsys, sets / "gen", "--sigma", "0.5", "2", *common)
    assert many["sigma"] == [0.5, 2.0] and len(many["rke"]) == 2 and len(many["vendi"]) == 2


def test_second_run_reads_the_cache_without_loading_the_model(sets, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    args = [sets / "gen", "--encoder", "pixels", "--cache", cache]
    first = _json(capsys, *args)
    assert first["cache"] == {"cached": 0, "encoded": 12, "dir": str(cache)}

    def boom(*a, **k):
        raise AssertionError("the encoder was loaded although every embedding is cached")

    monkeypatch.setattr(encoders, "load_encoder", boom)
    second = _json(capsys, *args)
    assert second["cache"]["encoded"] == 0 and second["cache"]["cached"] == 12
    assert second["rke"] == first["rke"]
    monkeypatch.undo()
    one = sorted((sets / "gen").glob("*.png"))[0]
    st = one.stat()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, same bytes
    third = _json(capsys, *args)  # the cache is keyed on the content (tests/test_cli_files.py)
    assert third["cache"]["encoded"] == 0 and third["cache"]["cached"] == 12


def test_embedding_files_give_row_indices(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (6, 4)), rng.normal(5, 0.01, (6, 4))])
    y = rng.normal(0, 0.01, (8, 4))
    t = np.repeat(np.eye(2), 6, axis=0)
    for name, arr in (("x.npy", x), ("y.npy", y), ("t.npy", t)):
        np.save(tmp_path / name, arr)
    res = _json(
        capsys,
        tmp_path / "x.npy",
        "--reference",
        tmp_path / "y.npy",
        "--prompts",
        tmp_path / "t.npy",
        "--sigma",
        "1",
        "--sigma-t",
        "0.1",
        "--no-cache",
    )
    assert res["encoder"] == "embeddings" and res["n"] == 12
    assert res["rke"] == pytest.approx(2.0, rel=1e-3)
    assert res["cond_rke"] == pytest.approx(1.0, rel=1e-3)  # one mode per prompt
    assert all(isinstance(i, int) for m in res["modes"] for i in m["files"])
    assert sorted(res["novel_modes"][0]["files"][:6]) == list(range(6, 12))  # the mode REF lacks


@pytest.mark.slow
def test_report_is_written_whole_or_not_at_all(sets, tmp_path, capsys):
    out = tmp_path / "report"
    code, _, err = _run(
        capsys,
        sets / "gen",
        "--reference",
        sets / "ref",
        "--encoder",
        "pixels",
        "--no-cache",
        "--out",
        out,
    )
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        ".rkekernels-report",
        "crowded.png",
        "modes.png",
        "novel_modes.png",
        "report.md",
        "results.json",
        "sweep.png",
    ]
    text = (out / "report.md").read_text()
    assert "![top modes](modes.png)" in text and "RKE" in text and "interval" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["n"] == 12 and len(saved["sweep"]["sigma"]) == 9
    # a corrupt image: exit 2, one line, nothing left in the parent folder
    bad = tmp_path / "bad"
    write_images(bad, 3)
    (bad / "img_001.png").write_bytes(b"\x89PNG broken")
    before = sorted(os.listdir(tmp_path))
    code, _, err = _run(capsys, bad, "--encoder", "pixels", "--no-cache", "--out", tmp_path / "r2")
    assert code == 2 and "img_001.png" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "case,needle",
    [
        ("empty", "no images"),
        ("prompts", "has 2 prompts for 12 samples"),
        ("csv", "no prompt for image"),
        ("encoder", "unknown encoder 'resnet'"),
        ("offline", "hf download no-such/model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, needle, sets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [sets / "gen", "--encoder", "pixels", "--no-cache"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        args[0] = tmp_path / "empty"
    elif case == "prompts":
        (tmp_path / "p.txt").write_text("one\ntwo\n")
        args += ["--prompts", tmp_path / "p.txt"]
    elif case == "csv":
        (tmp_path / "p.csv").write_text("file,prompt\nimg_000.png,a cat\n")
        args += ["--prompts", tmp_path / "p.csv"]
    elif case == "encoder":
        args[2] = "resnet"
    else:
        args[2:4] = ["dinov2", "--encoder-model", "no-such/model", "--no-cache"]
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_one_or_two_images_give_scores_without_an_interval(sets, tmp_path, capsys):
    one = tmp_path / "one"
    write_images(one, 1)
    res = _json(capsys, one, "--encoder", "pixels", "--no-cache", "--reference", sets / "ref")
    assert res["n"] == 1 and res["rke"] == pytest.approx(1.0) and res["vendi"] == pytest.approx(1.0)
    assert res["rke_interval"]["low"] is None and res["novelty"] == 0.0
    write_images(one, 2)
    res = _json(capsys, one, "--encoder", "pixels", "--no-cache", "--unbiased")
    assert res["n"] == 2 and res["rke_interval"]["high"] is None  # unbiased needs n >= 3
    res = _json(capsys, one, "--encoder", "pixels", "--no-cache")
    assert res["rke_interval"]["low"] <= res["rke"] <= res["rke_interval"]["high"]


def test_clip_encoder_embeds_prompts_with_its_own_text_tower(sets, tiny_encoder_dirs, capsys):
    res = _json(
        capsys,
        sets / "gen",
        "--encoder",
        "clip",
        "--encoder-model",
        tiny_encoder_dirs["clip"],
        "--prompts",
        sets / "prompts.txt",
        "--no-cache",
    )
    assert res["encoder"] == "clip" and res["d"] == 16
    assert 1.0 <= res["cond_rke"] <= res["n"]
    assert torch.isfinite(torch.tensor(res["cond_vendi"]))


def test_evaluate_takes_one_sigma_as_a_number(tmp_path):
    """sigma=1.0 (not a list) is one given bandwidth; a bad one is a one-line error naming sigma
    (was a raw TypeError from len() before any check)."""
    p = tmp_path / "x.npy"
    np.save(p, np.random.default_rng(0).normal(size=(30, 3)))
    res = evaluation.evaluate(str(p), sigma=1.0, cache_dir=None)
    assert res["sigma"] == 1.0 and res["sigma_from"] == "given"
    with pytest.raises(rkekernels._errors.CLIError, match="sigma must be finite and > 0"):
        evaluation.evaluate(str(p), sigma=-1.0, cache_dir=None)
