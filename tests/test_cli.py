"""The command line: file formats, JSON equal to the API, several bandwidths, every error path."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rkekernels
from rkekernels.cli import BENCH_SCRIPTS, main

N, D, M = 60, 5, 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    t = np.repeat(rng.normal(size=(4, M)), N // 4, axis=0)
    return x, t


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv):
    code, out, err = _run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _save(path: Path, fmt: str, arr: np.ndarray, key: str = "emb"):
    if fmt == "npy":
        np.save(path, arr)
    elif fmt == "npz":
        np.savez(path, **{key: arr})
    elif fmt == "pt":
        torch.save(torch.from_numpy(arr), path)
    elif fmt == "pt-dict":
        torch.save({key: torch.from_numpy(arr), "note": "not a tensor"}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({key: torch.from_numpy(arr).contiguous()}, str(path))
    return path


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt", "pt-dict", "safetensors"])
def test_each_format_json_equals_api(tmp_path, capsys, data, fmt):
    x, t = data
    ext = {"pt-dict": "pt"}.get(fmt, fmt)
    px = _save(tmp_path / f"x.{ext}", fmt, x.astype(np.float32))
    pt = _save(tmp_path / f"t.{ext}", fmt, t.astype(np.float32))
    res = _json(capsys, "score", px, "--cond", pt)
    assert set(res) == {
        *("rke", "cond_rke", "h_x", "h_t", "h_xt", "h_x_given_t", "mutual_info"),
        *("sigma", "sigma_cond", "order", "kernel", "method"),
    }
    assert (res["order"], res["kernel"], res["method"]) == (2.0, "gaussian", "exact")
    xt, tt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(t.astype(np.float32))
    s, sc = rkekernels.default_bandwidth(xt), rkekernels.default_bandwidth(tt)
    assert res["sigma"] == pytest.approx(s, rel=1e-12)
    assert res["sigma_cond"] == pytest.approx(sc, rel=1e-12)
    assert res["rke"] == pytest.approx(float(rkekernels.rke_score(xt, s)), rel=1e-5)
    assert res["cond_rke"] == pytest.approx(
        float(rkekernels.cond_rke_score(xt, tt, s, sc)), rel=1e-5
    )
    e = rkekernels.rke_entropies(xt, tt, s, sc)
    for k in e._fields:
        assert res[k] == pytest.approx(float(getattr(e, k)), rel=1e-5, abs=1e-6), k


def test_float64_exact_and_unconditional_keys(tmp_path, capsys, data):
    x, t = data
    px = _save(tmp_path / "x.npy", "npy", x)
    res = _json(capsys, "score", px, "--sigma", 0.7)
    assert set(res) == {"rke", "sigma", "order", "kernel", "method"} and res["sigma"] == 0.7
    assert res["rke"] == pytest.approx(rkekernels.rke_score(x, 0.7), rel=1e-12)
    pt = _save(tmp_path / "t.npy", "npy", t)
    res = _json(capsys, "score", px, "--cond", pt, "--sigma", 0.7, "--sigma-cond", 0.3)
    assert res["sigma_cond"] == 0.3
    assert res["cond_rke"] == pytest.approx(rkekernels.cond_rke_score(x, t, 0.7, 0.3), rel=1e-12)
    assert res["rke"] == pytest.approx(rkekernels.rke_score(x, 0.7), rel=1e-12)
    assert res["mutual_info"] == pytest.approx(
        res["h_x"] + res["h_t"] - res["h_xt"], rel=1e-12, abs=1e-12
    )


def test_several_sigmas(tmp_path, capsys, data):
    x, t = data
    px, pt = _save(tmp_path / "x.npy", "npy", x), _save(tmp_path / "t.npy", "npy", t)
    sig = [0.3, 1.0, 4.0]
    res = _json(capsys, "score", px, "--cond", pt, "--sigma", *sig[:2], "--sigma", sig[2])
    assert res["sigma"] == sig
    assert res["rke"] == pytest.approx(list(rkekernels.rke_score(x, sig)), rel=1e-12)
    want = rkekernels.cond_rke_score(x, t, sig, res["sigma_cond"])
    assert res["cond_rke"] == pytest.approx(list(want), rel=1e-12)
    assert all(isinstance(res[k], list) and len(res[k]) == 3 for k in ("h_x", "h_t", "h_xt"))
    # RKE decreases as the bandwidth grows
    assert res["rke"][0] > res["rke"][1] > res["rke"][2]
    code, out, _ = _run(capsys, "score", px, "--cond", pt, "--sigma", *sig)
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "cond RKE" in line)
    assert "H2(X|T)" in lines[header] and "I2(X;T)" in lines[header]
    assert len(lines[header + 1 : header + 4]) == 3
    assert [float(r.split()[0]) for r in lines[header + 1 : header + 4]] == sig


def test_text_output_names_bandwidths(tmp_path, capsys, data):
    x, t = data
    px, pt = _save(tmp_path / "x.npy", "npy", x), _save(tmp_path / "t.npy", "npy", t)
    code, out, err = _run(capsys, "score", px, "--cond", pt)
    assert code == 0 and err == ""
    assert "default_bandwidth" in out and "sigma_cond" in out
    assert f"n = {N}, d = {D}" in out and f"m = {M}" in out
    rke = float(rkekernels.rke_score(x))
    row = next(line for line in out.splitlines() if line.strip()[0].isdigit())
    assert float(row.split()[1]) == pytest.approx(rke, rel=1e-5)


def test_npz_key_flatten_and_progress(tmp_path, capsys, data):
    x, _ = data
    p = tmp_path / "many.npz"
    np.savez(p, a=x, b=2 * x, img=x.reshape(N, D, 1))
    res = _json(capsys, "score", p, "--key", "b", "--sigma", 1.0)
    assert res["rke"] == pytest.approx(rkekernels.rke_score(2 * x, 1.0), rel=1e-12)
    res = _json(capsys, "score", p, "--key", "img", "--flatten", "--sigma", 1.0)
    assert res["rke"] == pytest.approx(rkekernels.rke_score(x, 1.0), rel=1e-12)
    code, out, err = _run(capsys, "score", p, "--key", "a", "--progress", "--json")
    # one 60 x 60 tile at the default tile size: 3,600 kernel entries; stderr, JSON on stdout
    assert code == 0 and f"100% of {N * N / 1000:.2f}k pairs" in err
    assert json.loads(out)["rke"] == pytest.approx(rkekernels.rke_score(x), rel=1e-12)


def _bad_files(tmp_path, x, t):
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "short.npy", t[:10])
    nan = x.copy()
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "vec.npy", x[:, 0])
    np.save(tmp_path / "img.npy", x.reshape(N, D, 1))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    np.savez(tmp_path / "two.npz", a=x, b=x)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "x.csv").write_text("1,2\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.npy"], "missing.npy: no such file"),
        (["junk.npy"], "junk.npy: cannot read it as .npy"),
        (["junk.pt"], "junk.pt: cannot read it as .pt"),
        (["x.csv"], "unsupported file type '.csv'"),
        (["list.pt"], "holds a list, not a tensor"),
        (["nan.npy"], "nan.npy contains NaN or Inf (1 non-finite entries, first at row 3)"),
        (["vec.npy"], "vec.npy must be 2-D (n, d); got shape (60,): save it as (n, d)"),
        (["img.npy"], "img.npy must be 2-D (n, d); got shape (60, 5, 1): use --flatten"),
        (["empty.npy"], "empty.npy is empty (n = 0)"),
        (["str.npy"], "non-numeric dtype"),
        (["two.npz"], "holds several arrays ['a', 'b']; choose one with --key NAME"),
        (["two.npz", "--key", "c"], "no array named 'c'"),
        (["x.npy", "--cond", "short.npy"], "has n = 60 rows but"),
        (["x.npy", "--cond", "nan.npy"], "nan.npy contains NaN or Inf"),
        (["x.npy", "--sigma-cond", "1"], "--sigma-cond needs --cond"),
        (["x.npy", "--sigma", "0"], "must be finite and > 0"),
        (["x.npy", "--sigma", "nan"], "must be finite and > 0"),
        (["x.npy", "--sigma", "abc"], "not a number"),
        (["x.npy", "--bogus"], "unrecognized arguments: --bogus"),
        ([".", "--json"], "is a directory"),
    ],
)
def test_errors_exit_2_one_line(tmp_path, capsys, data, monkeypatch, argv, message):
    _bad_files(tmp_path, *data)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "score", *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("rkekernels: error: ")
    assert message in err
    assert "Traceback" not in err


def test_safetensors_missing_is_a_clear_error(tmp_path, capsys, data, monkeypatch):
    p = _save(tmp_path / "x.safetensors", "safetensors", data[0])
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails
    code, _, err = _run(capsys, "score", p)
    assert code == 2 and "needs the safetensors package: pip install safetensors" in err


def test_no_command_and_bench_without_scripts(tmp_path, capsys, monkeypatch):
    assert main([]) == 2
    capsys.readouterr()
    empty = tmp_path / "benchmarks"
    empty.mkdir()
    code, _, err = _run(capsys, "bench", "--dir", empty)
    assert code == 2 and "none of bench_scores.py" in err
    # one line per missing script, plus the error
    assert "not found" in err and err.count("\n") == len(BENCH_SCRIPTS) + 1


def test_bench_finds_the_checkout_benchmarks_from_elsewhere(tmp_path, monkeypatch):
    """Outside a checkout's root, `rkekernels bench` uses the benchmarks/ beside the package."""
    from rkekernels.cli import bench

    monkeypatch.chdir(tmp_path)  # no benchmarks/ here
    want = Path(rkekernels.__file__).resolve().parents[1] / "benchmarks"
    assert want.is_dir() and bench._bench_dir(None) == want


def test_bench_runs_scripts_and_prints_tables(tmp_path, capsys):
    bdir = tmp_path / "benchmarks"
    (bdir / "results").mkdir(parents=True)
    (bdir / "bench_scores.py").write_text(
        "import sys, pathlib\n"
        "quick = '--quick' in sys.argv\n"
        "name = 'bench_scores_quick.md' if quick else 'bench_scores.md'\n"
        "p = pathlib.Path(__file__).parent / 'results' / name\n"
        "mode = 'quick' if quick else 'full'\n"
        "p.write_text('| n | ratio |\\n|---|---|\\n| 10 | %s |\\n' % mode)\n"
    )
    (bdir / "bench_guidance.py").write_text("raise SystemExit(3)\n")
    code, out, err = _run(capsys, "bench", "--dir", bdir)
    assert code == 1
    assert "| 10 | quick |" in out and "bench_scores_quick.md" in out
    assert "bench_guidance.py failed with exit code 3" in err
    assert "bench_distributed.py: not found" in err
    code, out, _ = _run(capsys, "bench", "--dir", bdir, "--only", "scores", "--full")
    assert code == 0 and "| 10 | full |" in out


@pytest.mark.slow
def test_console_entry_point_subprocess(tmp_path, data):
    x, t = data
    px, pt = _save(tmp_path / "x.npy", "npy", x), _save(tmp_path / "t.npy", "npy", t)
    env = {**os.environ, "PYTHONPATH": str(Path(rkekernels.__file__).parents[1])}
    cmd = [sys.executable, "-m", "rkekernels", "score", str(px), "--cond", str(pt), "--json"]
    # the module entry point, on a file torch.load warns about: one line, no warning, no traceback
    p = _plain_pickle(tmp_path / "x.pt")
    cmd2 = [sys.executable, "-m", "rkekernels.cli", "score", str(p), "--sigma", "1.0"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    first, second = subprocess.Popen(cmd, **pipes), subprocess.Popen(cmd2, **pipes)  # at once
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    res = json.loads(out)
    assert math.isclose(res["cond_rke"], rkekernels.cond_rke_score(x, t), rel_tol=1e-12)
    out2, err2 = second.communicate(timeout=120)
    proc = subprocess.CompletedProcess(cmd2, second.returncode, out2, err2)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "pickle" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


def test_order_kernel_method_flags(tmp_path, capsys, data):
    x, t = data
    px, pt = _save(tmp_path / "x.npy", "npy", x), _save(tmp_path / "t.npy", "npy", t)
    res = _json(capsys, "score", px, "--order", 1, "--sigma", 0.9)
    assert (res["order"], res["method"]) == (1.0, "exact") and "rke" not in res
    assert res["vendi"] == pytest.approx(rkekernels.vendi_score(x, 1.0, 0.9), rel=1e-12)
    res = _json(capsys, "score", px, "--order", "inf", "--kernel", "cosine")
    assert (res["order"], res["kernel"], res["method"]) == ("inf", "cosine", "covariance")
    assert res["vendi"] == pytest.approx(
        rkekernels.vendi_score(x, math.inf, kernel="cosine"), rel=1e-12
    )
    res = _json(capsys, "score", px, "--kernel", "linear", "--method", "exact")
    assert res["rke"] == pytest.approx(rkekernels.rke_score(x, kernel="linear"), rel=1e-10)
    res = _json(capsys, "score", px, "--cond", pt, "--order", 1.5, "--sigma", 0.9,
                "--sigma-cond", 0.5, "--method", "nystrom")  # fmt: skip
    want = rkekernels.vendi_entropies(x, t, 1.5, 0.9, 0.5, method="nystrom")
    assert res["method"] == "nystrom"
    assert res["h_x_given_t"] == pytest.approx(want.h_x_given_t, rel=1e-12)
    assert res["cond_vendi"] == pytest.approx(math.exp(want.h_x_given_t), rel=1e-12)
    code, out, _ = _run(capsys, "score", px, "--order", 3, "--sigma", 0.9)
    assert code == 0 and "Vendi_3" in out and "method exact" in out


@pytest.mark.parametrize("refined", [("exact", None), ("rff", 64)])
def test_auto_method_resolved_as_the_library_does(tmp_path, capsys, data, monkeypatch, refined):
    """method "auto" past the exact budget goes through refine_auto in the CLI too (before:
    the CLI took pick_method's size-only "rff" at the default dim, the library refined it)."""
    import rkekernels._methods as methods_mod
    import rkekernels.vendi as vendi_mod

    x, t = data
    px, pt = _save(tmp_path / "x.npy", "npy", x), _save(tmp_path / "t.npy", "npy", t)
    monkeypatch.setattr(methods_mod, "AUTO_EXACT_MAX_N", 10)  # n = 60 is past the budget
    calls = []

    def refine(u, q, default_dim):
        calls.append((tuple(u.shape), q))
        return refined

    monkeypatch.setattr(vendi_mod, "refine_auto", refine)
    res = _json(capsys, "score", px, "--order", 1, "--sigma", 0.9)
    assert res["method"] == refined[0] and calls == [((N, D), 1.0)]  # resolved once
    want = rkekernels.vendi_score(x, 1.0, 0.9)  # the library's method="auto"
    assert res["vendi"] == pytest.approx(want, rel=1e-12)
    direct = rkekernels.vendi_score(x, 1.0, 0.9, method=refined[0], dim=refined[1])
    assert res["vendi"] == pytest.approx(direct, rel=1e-12)
    calls.clear()
    res = _json(capsys, "score", px, "--cond", pt, "--order", 1, "--sigma", 0.9,
                "--sigma-cond", 0.5)  # fmt: skip
    assert res["method"] == refined[0] and calls == [((N, D + M), 1.0)]
    want = rkekernels.vendi_entropies(x, t, 1.0, 0.9, 0.5)
    assert res["h_x_given_t"] == pytest.approx(float(want.h_x_given_t), rel=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kernel", "linear", "--method", "rff"], "method='rff' does not apply"),
        (["--kernel", "cosine", "--sigma", "1"], "gaussian kernel only"),
        (["--order", "0"], "must be finite and > 0"),
    ],
)
def test_order_flag_errors(tmp_path, capsys, data, argv, message):
    px = _save(tmp_path / "x.npy", "npy", data[0])
    code, _, err = _run(capsys, "score", px, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ issue 12: strict JSON, odd .pt


@pytest.mark.parametrize(
    "values, sigma",
    [
        (np.random.default_rng(1).normal(size=(6, 3)), "1e-30"),  # tiny bandwidth
        (np.array([[3e38], [-3e38], [0.0]]), "1.0"),  # near float32's largest number
    ],
)
def test_json_is_strict_at_the_edges(tmp_path, capsys, values, sigma):
    px = tmp_path / "x.npy"
    np.save(px, values.astype(np.float32))
    code, out, err = _run(capsys, "score", px, "--sigma", sigma, "--json")
    assert code == 0, err
    res = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert all(math.isfinite(v) for v in res.values() if isinstance(v, float))
    assert res["rke"] == pytest.approx(float(len(values)), rel=1e-5)


def test_odd_tensors_in_pt_files(tmp_path, capsys):
    x = torch.randn(8, 3)
    # float8: converted like float16 (a correct answer), no traceback
    p8 = tmp_path / "x8.pt"
    torch.save(x.to(torch.float8_e4m3fn), p8)
    res = _json(capsys, "score", p8, "--sigma", "1.0")
    assert res["rke"] == pytest.approx(
        float(rkekernels.rke_score(x.to(torch.float8_e4m3fn).float(), 1.0))
    )
    for name, value, msg in [
        ("sparse", x.to_sparse(), "sparse"),
        ("quant", torch.quantize_per_tensor(x, 0.1, 0, torch.qint8), "quantized"),
        ("bool", x > 0, "bool"),
    ]:
        p = tmp_path / f"{name}.pt"
        torch.save(value, p)
        code, out, err = _run(capsys, "score", p, "--sigma", "1.0")
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and msg in err, err


def _plain_pickle(path: Path) -> Path:
    import pickle

    with open(path, "wb") as fh:
        pickle.dump({"emb": [[1.0, 2.0]]}, fh)
    return path


def test_plain_pickle_pt_is_one_line_without_warnings(tmp_path, capsys):
    # torch.load warns about such files (and the weights_only retry): none of that reaches users
    p = _plain_pickle(tmp_path / "x.pt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, out, err = _run(capsys, "score", p, "--sigma", "1.0")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "x.pt" in err and "pickle" in err, err
    assert not seen, [str(w.message) for w in seen]
