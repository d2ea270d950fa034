"""The ``rkekernels`` command line: ``demo``, ``score`` and ``bench``.

    rkekernels demo [--samples N] [--prompts P] [--scale G] ...   the ground-truth guidance demo
    rkekernels score PATH [--cond PATH] [--sigma S ...] [--sigma-cond S] [--json] [--key NAME]
    rkekernels bench [--only NAME ...] [--full]                   the benchmark tables, here
    rkekernels evaluate GEN [--reference REF] [--prompts FILE] ...  images -> scores, report
                                                                  (rkekernels.evaluate)

``score`` reads embeddings from .npy, .npz (the array named by --key, or the only one), .pt/.pth
(a tensor, or a dict of tensors with --key) and .safetensors (with the ``safetensors`` package),
and prints the RKE score, the conditional RKE and the order-2 entropy decomposition (nats) with
the bandwidths used (`default_bandwidth` unless given). Values come from the public API
(`rkekernels.rke_score`, `rkekernels.rke_entropies`, `rkekernels.default_bandwidth`).

Bad input (a missing or unreadable file, a wrong shape, NaN/Inf, different n) prints one line on
stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import CLIError

__all__ = ["load_array", "main", "score_files"]

PROG = "rkekernels"
PROGRESS_MIN_N = 20_000  # a progress bar from this many rows on
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit; we keep one line
        raise CLIError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# loading


def _pick(arrays: dict[str, Any], key: str | None, path: Path) -> Any:
    if key is not None:
        if key not in arrays:
            raise CLIError(f"{path}: no array named {key!r}; it holds {sorted(arrays)}")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if not arrays:
        raise CLIError(f"{path}: holds no arrays")
    raise CLIError(f"{path}: holds several arrays {sorted(arrays)}; choose one with --key NAME")


def load_array(path: str | os.PathLike, key: str | None = None):
    """Load one (n, ...) array from .npy, .npz, .pt/.pth or .safetensors as a torch tensor.

    Args:
        path: the file.
        key: name of the array inside an .npz, a dict saved in .pt, or a .safetensors file;
            None picks the only array.

    Returns:
        torch.Tensor on the CPU.

    Raises:
        CLIError: missing or unreadable file, unknown extension, missing key, not an array.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from rkekernels.cli import load_array
        >>> p = os.path.join(tempfile.mkdtemp(), "x.npz")
        >>> np.savez(p, emb=np.ones((3, 2)))
        >>> load_array(p).shape
        torch.Size([3, 2])
    """
    import numpy as np
    import torch

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: no such file")
    if p.is_dir():
        raise CLIError(f"{p}: is a directory, not an array file")
    ext = p.suffix.lower()
    try:
        if ext == ".npy":
            if key is not None:
                raise CLIError(f"{p}: --key applies to .npz, .pt and .safetensors files only")
            value = np.load(p, allow_pickle=False)
        elif ext == ".npz":
            with np.load(p, allow_pickle=False) as data:
                value = _pick({k: data[k] for k in data.files}, key, p)
        elif ext in (".pt", ".pth"):
            with warnings.catch_warnings():  # torch's warnings about the pickle: not for users
                warnings.simplefilter("ignore")
                try:
                    obj = torch.load(p, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError:
                    raise CLIError(
                        f"{p}: cannot read it as .pt: not tensors saved by torch.save (a plain "
                        "pickle, or another format?); "
                        "rkekernels reads .pt files with weights_only=True, save the array with "
                        "torch.save(tensor, path) or np.save"
                    ) from None
            if isinstance(obj, dict):
                arrays = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                value = _pick(arrays, key, p)
            elif isinstance(obj, torch.Tensor):
                if key is not None:
                    raise CLIError(f"{p}: holds a single tensor, not a dict; drop --key")
                value = obj
            else:
                raise CLIError(f"{p}: holds a {type(obj).__name__}, not a tensor or dict of them")
        elif ext == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CLIError(
                    f"{p}: reading .safetensors needs the safetensors package: "
                    "pip install safetensors (or rkekernels[io])"
                ) from None
            value = _pick(load_file(str(p), device="cpu"), key, p)
        else:
            raise CLIError(
                f"{p}: unsupported file type {ext or '(none)'!r}; "
                "use .npy, .npz, .pt/.pth or .safetensors"
            )
    except CLIError:
        raise
    except Exception as exc:  # any reader failure is a bad file for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"{p}: cannot read it as {ext}: {msg}") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise CLIError(f"{p}: has non-numeric dtype {value.dtype}; need real numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise CLIError(f"{p}: holds a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise CLIError(f"{p}: holds a {value.layout} (sparse) tensor; save it dense (to_dense())")
    if value.is_quantized:
        raise CLIError(f"{p}: holds a quantized tensor; save it dequantized (dequantize())")
    if value.is_complex() or value.dtype == torch.bool:
        raise CLIError(f"{p}: has dtype {value.dtype}; need real numbers")
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
        value = value.to(torch.float32)  # float16 / bfloat16 / float8: scored in float32
    return value


def _as_matrix(value, path: str, flatten: bool):
    """``value`` checked as a 2-D (n, d) matrix by `rkekernels._input.check_matrix` (flattened
    to (n, prod ...) first with ``flatten``); its error, naming the file ``path``, as a CLIError."""
    from ._input import check_matrix

    if value.dim() > 2 and flatten:
        value = value.reshape(value.shape[0], -1)
    hint = (
        "use --flatten to treat each row as one sample"
        if value.dim() > 2
        else "save it as (n, d), one row per sample"
    )
    try:
        return check_matrix(value, path, hint=hint)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# score


def _to_py(v: Any) -> float | list[float]:
    import torch

    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double()
        return float(v) if v.dim() == 0 else [float(a) for a in v]
    return float(v)


@contextlib.contextmanager
def _stages(total: int, enabled: bool, desc: str):
    """A progress bar over the passes of the computation (stderr), or nothing."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit="pass", file=sys.stderr, leave=False)
            bar.set_postfix_str("bandwidths")
        except ImportError:  # tqdm is an optional dependency (rkekernels[demo])
            bar = None

    def step(label: str) -> None:  # one pass done; ``label`` names the next one
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(label)

    try:
        yield step
    finally:
        if bar is not None:
            bar.close()


def score_files(
    path: str,
    cond: str | None = None,
    sigma: Sequence[float] | None = None,
    sigma_cond: float | None = None,
    *,
    key: str | None = None,
    cond_key: str | None = None,
    flatten: bool = False,
    backend: str = "auto",
    progress: bool | None = None,
    order: float = 2.0,
    kernel: str = "gaussian",
    method: str = "auto",
) -> dict[str, Any]:
    """Compute the scores of an embedding file (and its prompt embeddings) with the public API.

    RKE = exp(H2(X)) = n^2 / sum_ij Kx^2; with prompts, CondRKE = exp(H2(X|T)) and the entropy
    decomposition H2(X), H2(T), H2(X,T), H2(X|T), I2(X;T) from one `rke_entropies` pass.
    Another ``order`` q, ``kernel`` or ``method`` goes through `vendi_score` /
    `vendi_entropies`: then "vendi" (and "cond_vendi") hold exp(H_q(X)) (exp(H_q(X|T))), the
    entropies are of order q, and "rke" / "cond_rke" are present when q = 2.

    Args:
        path: samples file (n, d). cond: prompt embeddings file (n, m) or None.
        sigma: bandwidths for x (None: `default_bandwidth`); one gives floats, several give
            lists (one value per bandwidth).
        sigma_cond: bandwidth for the prompts (None: their `default_bandwidth`).
        key, cond_key: array names inside multi-array files.
        flatten: reshape (n, ...) to (n, d) instead of refusing non-2-D arrays.
        backend: "auto", "torch" or "triton".
        progress: progress bar on stderr (None: when n >= 20,000).
        order: the order q > 0 (``math.inf`` included); kernel: "gaussian", "cosine" or
            "linear" (no sigma); method: see `rkekernels.vendi_score`.

    Returns:
        dict with rke, sigma and, with ``cond``, cond_rke, h_x, h_t, h_xt, h_x_given_t,
        mutual_info, sigma_cond (floats, or lists over several sigmas); plus "shape"
        ({"n", "d", "m"}), "default_sigma" / "default_sigma_cond" (whether the default
        bandwidth was used), "order", "kernel" and "method" (the method that ran).

    Raises:
        CLIError: bad files or arrays (see `load_array`), or an error from the API.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from rkekernels.cli import score_files
        >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(p, np.repeat(np.eye(3) * 100.0, 5, axis=0))
        >>> round(score_files(p, sigma=[1.0])["rke"], 6)
        3.0
    """
    import torch

    import rkekernels

    x = _as_matrix(load_array(path, key), str(path), flatten)
    t = None
    if cond is not None:
        t = _as_matrix(load_array(cond, cond_key), str(cond), flatten)
        if t.shape[0] != x.shape[0]:
            raise CLIError(
                f"{path} has n = {x.shape[0]} rows but {cond} has n = {t.shape[0]}; "
                "give one prompt embedding per sample"
            )
    n = x.shape[0]
    show = n >= PROGRESS_MIN_N if progress is None else progress
    many = sigma is not None and len(sigma) > 1
    order_q = 2.0 if order is None else order
    try:
        if kernel != "gaussian" and (sigma is not None or sigma_cond is not None):
            raise ValueError(
                f"--sigma / --sigma-cond apply to the gaussian kernel only, not {kernel!r}"
            )
        width = x.shape[1] + (t.shape[1] if t is not None else 0)
        if kernel != "gaussian" and t is not None:
            width = x.shape[1] * t.shape[1]
        used = rkekernels.vendi.pick_method(
            method, kernel=kernel, n=n, width=width, q=rkekernels.vendi.check_order(order_q)
        )
        if (kernel, order_q, used) != ("gaussian", 2.0, "exact"):
            out = _score_order_q(x, t, sigma, sigma_cond, order_q, kernel, used)
            out.update(order=_order_out(order_q), kernel=kernel, method=used)
            out["shape"] = {"n": n, "d": x.shape[1], **({"m": t.shape[1]} if t is not None else {})}
            out["default_sigma"] = kernel == "gaussian" and sigma is None
            out["default_sigma_cond"] = (
                kernel == "gaussian" and t is not None and sigma_cond is None
            )
            return out
        with _stages(2, show, f"scoring n={n}") as step:
            sig = [float(rkekernels.default_bandwidth(x))] if sigma is None else list(sigma)
            sig_c = None
            if t is not None:
                sig_c = float(sigma_cond) if sigma_cond is not None else None
                sig_c = sig_c if sig_c is not None else float(rkekernels.default_bandwidth(t))
            step("pair sums (one streamed pass over all n^2 pairs)")
            arg = sig if many else sig[0]
            with torch.no_grad():
                if t is None:
                    out: dict[str, Any] = {
                        "rke": _to_py(rkekernels.rke_score(x, arg, backend=backend))
                    }
                else:
                    e = rkekernels.rke_entropies(x, t, arg, sig_c, backend=backend)
                    vals = {k: _to_py(getattr(e, k)) for k in e._fields}
                    exp = (lambda v: [math.exp(a) for a in v]) if many else math.exp
                    out = {"rke": exp(vals["h_x"]), "cond_rke": exp(vals["h_x_given_t"]), **vals}
            step("done")
    except (ValueError, TypeError) as exc:  # API validation (SPEC section 4): one line
        raise CLIError(str(exc)) from None
    out["sigma"] = sig if many else sig[0]
    if t is not None:
        out["sigma_cond"] = sig_c
    out["shape"] = {"n": n, "d": x.shape[1], **({"m": t.shape[1]} if t is not None else {})}
    out["default_sigma"] = sigma is None
    out["default_sigma_cond"] = t is not None and sigma_cond is None
    out.update(order=_order_out(order_q), kernel=kernel, method="exact")
    return out


def _order_out(q: float) -> float | str:
    return "inf" if math.isinf(q) else q


def _score_order_q(x, t, sigma, sigma_cond, q, kernel, method) -> dict[str, Any]:
    """The order-q scores of `score_files` (another order, kernel or method than RKE's)."""
    import torch

    import rkekernels

    many = sigma is not None and len(sigma) > 1
    kw: dict[str, Any] = {"kernel": kernel, "method": method}
    sig = None
    if kernel == "gaussian":
        sig = [float(rkekernels.default_bandwidth(x))] if sigma is None else list(sigma)
        kw["sigma"] = sig if many else sig[0]
    with torch.no_grad():
        if t is None:
            out: dict[str, Any] = {"vendi": _to_py(rkekernels.vendi_score(x, q, **kw))}
        else:
            if kernel == "gaussian":
                kw["sigma_t"] = (
                    float(sigma_cond) if sigma_cond is not None else rkekernels.default_bandwidth(t)
                )
            e = rkekernels.vendi_entropies(x, t, q, **kw)
            vals = {k: _to_py(getattr(e, k)) for k in e._fields}
            exp = (lambda v: [math.exp(a) for a in v]) if many else math.exp
            out = {"vendi": exp(vals["h_x"]), "cond_vendi": exp(vals["h_x_given_t"]), **vals}
            out["sigma_cond"] = kw.get("sigma_t")
    if q == 2.0:
        out["rke"] = out["vendi"]
        if t is not None:
            out["cond_rke"] = out["cond_vendi"]
    out["sigma"] = (sig if many else sig[0]) if sig is not None else None
    return out


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _print_scores(res: dict[str, Any], args) -> None:
    shape = res["shape"]
    sig_default, cond_default = res["default_sigma"], res["default_sigma_cond"]
    print(f"samples: {args.path}  (n = {shape['n']}, d = {shape['d']})")
    if args.cond is not None:
        print(f"prompts: {args.cond}  (m = {shape['m']})")
    sigmas = res["sigma"] if isinstance(res["sigma"], list) else [res["sigma"]]
    q = f"{float(res['order']):g}"
    print(f"kernel {res['kernel']}, order q = {q}, method {res['method']}")
    if res["kernel"] == "gaussian":
        how = "default_bandwidth (plateau of the score curve)" if sig_default else "given"
        print(f"bandwidth sigma      = {', '.join(_fmt(s) for s in sigmas)}  ({how})")
    if args.cond is not None and res["kernel"] == "gaussian":
        how = "default_bandwidth (plateau of the score curve)" if cond_default else "given"
        print(f"bandwidth sigma_cond = {_fmt(res['sigma_cond'])}  ({how})")
    cols = [("sigma", "sigma")] if res["kernel"] == "gaussian" else []
    cols += [("rke", "RKE")] if "rke" in res else [("vendi", f"Vendi_{q}")]
    if args.cond is not None:
        cols += [("cond_rke", "cond RKE")] if "rke" in res else [("cond_vendi", f"cond Vendi_{q}")]
        cols += [
            ("h_x", f"H{q}(X)"),
            ("h_t", f"H{q}(T)"),
            ("h_xt", f"H{q}(X,T)"),
            ("h_x_given_t", f"H{q}(X|T)"),
            ("mutual_info", f"I{q}(X;T)"),
        ]
    rows = []
    for i in range(len(sigmas)):
        row = []
        for k, _ in cols:
            v = res[k]
            row.append(_fmt(v[i] if isinstance(v, list) else v))
        rows.append(row)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, (_, h) in enumerate(cols)]
    print("  ".join(h.rjust(w) for (_, h), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if args.cond is not None:
        print(f"(entropies in nats; exp H{q}(X) and exp H{q}(X|T) are the scores)")


def _cmd_score(args) -> int:
    if args.sigma_cond is not None and args.cond is None:
        raise CLIError("--sigma-cond needs --cond PATH (the prompt embeddings)")
    res = score_files(
        args.path,
        args.cond,
        args.sigma,
        args.sigma_cond,
        key=args.key,
        cond_key=args.cond_key,
        flatten=args.flatten,
        backend=args.backend,
        progress=args.progress,
        order=args.order,
        kernel=args.kernel,
        method=args.method,
    )
    if args.json:
        keys = ["rke", "vendi", "sigma"]
        if args.cond is not None:
            keys = ["rke", "cond_rke", "vendi", "cond_vendi", "h_x", "h_t", "h_xt"]
            keys += ["h_x_given_t", "mutual_info", "sigma", "sigma_cond"]
        keys += ["order", "kernel", "method"]
        try:  # strict JSON: never NaN or Infinity
            print(json.dumps({k: res[k] for k in keys if k in res}, allow_nan=False))
        except ValueError:
            raise CLIError("a score is not finite; this is a bug, please report it") from None
    else:
        _print_scores(res, args)
    return 0


def _cmd_compare(args) -> int:
    """`rkekernels compare`: several files at one shared bandwidth, or a shared sweep."""
    import numpy as np

    import rkekernels

    names = [str(p) for p in args.paths]
    if len(set(names)) != len(names):
        raise CLIError("compare: a file is given twice")
    sets = {n: _as_matrix(load_array(n, args.key), n, args.flatten) for n in names}
    widths = {v.shape[1] for v in sets.values()}
    if len(widths) > 1:
        raise CLIError(f"compare: the files have different widths d {sorted(widths)}")
    if args.plot and not args.sweep:
        raise CLIError("--plot needs --sweep N")
    if args.sweep is not None and args.sweep < 2:
        raise CLIError(f"--sweep must be at least 2, got {args.sweep}")
    ref = None
    if args.reference is not None:
        ref = _as_matrix(load_array(args.reference, args.key), args.reference, args.flatten)
    first = ref if ref is not None else next(iter(sets.values()))
    try:
        if args.sweep:
            grid = rkekernels.compare.sweep_grid(first, args.sweep)
            if args.sigma is not None:  # centred on the given sigma instead
                grid = grid * (args.sigma / float(np.sqrt(grid[0] * grid[-1])))
            curves = {
                n: rkekernels.rke_sweep(v, grid, backend=args.backend) for n, v in sets.items()
            }
            out = {
                "sigma": [float(s) for s in grid],
                "rke": {n: [float(r) for r in c.rke] for n, c in curves.items()},
            }
            if args.plot:
                try:
                    rkekernels.plot_sweep(curves, args.plot, title="RKE against a shared sigma")
                except ImportError as exc:
                    raise CLIError(str(exc)) from None
        else:
            res = rkekernels.rke_scores(sets, args.sigma, reference=ref, backend=args.backend)
            out = {"sigma": res.sigma, "rke": res.scores}
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        try:
            print(json.dumps(out, allow_nan=False))
        except ValueError:
            raise CLIError("a score is not finite; this is a bug, please report it") from None
        return 0
    src = (
        "given" if args.sigma is not None else f"default_bandwidth of {args.reference or names[0]}"
    )
    if args.sweep:
        print(f"RKE at {len(out['sigma'])} shared bandwidths ({src} sets the grid)")
        print("sigma".rjust(12) + "".join(n[-14:].rjust(16) for n in names))
        for i, s in enumerate(out["sigma"]):
            print(f"{s:12.5g}" + "".join(f"{out['rke'][n][i]:16.5g}" for n in names))
    else:
        print(f"shared bandwidth sigma = {out['sigma']:.6g} ({src}); the scores compare")
        for n in names:
            print(f"{out['rke'][n]:12.5g}  {n}")
    return 0


def _order(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "infinity") else _positive(text)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return v


# ---------------------------------------------------------------------------------------------
# bench

BENCH_SCRIPTS = (
    "bench_scores.py",
    "bench_guidance.py",
    "bench_distributed.py",
    "bench_vendi.py",
)


def _bench_dir(given: str | None) -> Path | None:
    if given:
        return Path(given)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "benchmarks").is_dir():
            return base / "benchmarks"
    return None


def _cmd_bench(args) -> int:
    bdir = _bench_dir(args.dir)
    if bdir is None or not bdir.is_dir():
        raise CLIError(
            "no benchmarks/ folder found: run `rkekernels bench` from a checkout of the "
            "rkekernels repository (or pass --dir PATH)"
        )
    names = list(BENCH_SCRIPTS)
    if args.only:
        names = [
            n if n.endswith(".py") else f"bench_{n.removeprefix('bench_')}.py" for n in args.only
        ]
    ran = 0
    failed = []
    for name in names:
        script = bdir / name
        if not script.is_file():
            print(f"[bench] {name}: not found in {bdir}, skipped", file=sys.stderr)
            continue
        cmd = [sys.executable, str(script)]
        source = script.read_text(errors="replace")
        if not args.full and "--quick" in source:
            cmd.append("--quick")
        print(f"[bench] running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        started = time.time()
        proc = subprocess.run(cmd, cwd=str(bdir.parent), stdout=subprocess.PIPE, text=True)
        ran += 1
        if proc.returncode != 0:
            failed.append(name)
            print(f"[bench] {name} failed with exit code {proc.returncode}", file=sys.stderr)
            if proc.stdout:
                print(proc.stdout, end="")
            continue
        stem = script.stem
        names_md = {f"{stem}.md", f"{stem}_quick.md", f"{stem.removeprefix('bench_')}.md"}
        tables = [
            p
            for p in (bdir / "results" / n for n in names_md)
            if p.is_file() and p.stat().st_mtime >= started - 1  # written by this run
        ]
        print(f"\n## {stem}\n")
        if tables:
            for p in sorted(tables):
                print(p.read_text().rstrip())
                print(f"\n(table saved in {p})")
        else:
            print(proc.stdout.rstrip() if proc.stdout else "(the script printed nothing)")
    if ran == 0:
        raise CLIError(f"none of {', '.join(names)} exists in {bdir}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=PROG, description="Exact RKE diversity scores and SPARKE guidance.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(
        dest="command", metavar="{demo,score,compare,evaluate,bench}", parser_class=_Parser
    )

    d = sub.add_parser(
        "demo",
        help="ground-truth guidance demo on an exact prompt-conditioned diffusion model",
        description="Sample an exact, prompt-conditioned toy diffusion model with and without "
        "SPARKE guidance; print modes covered, RKE, precision and overhead; save a figure.",
    )
    from . import demo

    demo.add_arguments(d)

    s = sub.add_parser(
        "score",
        help="RKE, conditional RKE and entropies of an embedding file",
        description="Print the RKE score (and, with --cond, the conditional RKE and the order-2 "
        "entropy decomposition in nats) of embeddings stored in .npy, .npz, .pt or .safetensors.",
    )
    s.add_argument("path", help="samples (n, d): .npy, .npz, .pt/.pth or .safetensors")
    s.add_argument("--cond", metavar="PATH", help="prompt embeddings (n, m), one per sample")
    s.add_argument(
        "--sigma",
        type=_positive,
        nargs="+",
        action="extend",
        metavar="S",
        help="bandwidth(s) for the samples (default: default_bandwidth, the plateau of the "
        "score curve); several values give one row each",
    )
    s.add_argument(
        "--sigma-cond",
        type=_positive,
        metavar="S",
        help="bandwidth for the prompt embeddings (default: their default_bandwidth)",
    )
    s.add_argument(
        "--order",
        type=_order,
        default=2.0,
        metavar="Q",
        help="entropy order q > 0 ('inf' allowed; default 2: RKE; 1: the Vendi score)",
    )
    s.add_argument("--kernel", choices=("gaussian", "cosine", "linear"), default="gaussian")
    s.add_argument(
        "--method",
        choices=("auto", "exact", "covariance", "rff", "nystrom", "lanczos"),
        default="auto",
        help="how the spectrum is computed (see rkekernels.vendi_score; the JSON names it)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--key", metavar="NAME", help="array name in .npz / .pt dict / .safetensors")
    s.add_argument("--cond-key", metavar="NAME", help="array name in the --cond file")
    s.add_argument("--flatten", action="store_true", help="reshape (n, ...) arrays to (n, d)")
    s.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    s.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar on stderr (default: when n >= {PROGRESS_MIN_N:,})",
    )

    c = sub.add_parser(
        "compare",
        help="RKE of several embedding files at ONE shared bandwidth, or a bandwidth sweep",
        description="Score several files with one bandwidth (--sigma, else default_bandwidth of "
        "--reference or of the first file), so the scores compare; --sweep N scores each file "
        "over N shared bandwidths (RKE against sigma) and --plot FILE draws the curves. "
        "Per-file default bandwidths would not compare across files.",
    )
    c.add_argument("paths", nargs="+", metavar="PATH", help="embedding files (n_i, d)")
    c.add_argument("--sigma", type=_positive, metavar="S", help="the shared bandwidth")
    c.add_argument(
        "--reference", metavar="PATH", help="file whose default_bandwidth is shared (default: "
        "the first PATH)",
    )  # fmt: skip
    c.add_argument("--sweep", type=int, metavar="N", help="score over N bandwidths instead")
    c.add_argument("--plot", metavar="FILE", help="with --sweep: save the curves (matplotlib)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--key", metavar="NAME", help="array name in .npz / .pt dict / .safetensors")
    c.add_argument("--flatten", action="store_true", help="reshape (n, ...) arrays to (n, d)")
    c.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")

    e = sub.add_parser(
        "evaluate",
        help="evaluate folders of generated images: RKE, Vendi, intervals, novelty, report",
        description="Embed a folder of images (or read embeddings), print RKE with its interval, "
        "Vendi, modes, conditional scores (--prompts) and novelty (--reference); --out DIR "
        "writes a report.",
    )
    from . import evaluate

    evaluate.add_arguments(e)

    b = sub.add_parser(
        "bench",
        help="run the benchmark scripts and print their tables",
        description="Run benchmarks/bench_*.py (quick mode unless --full) with this Python and "
        "print the markdown tables they write to benchmarks/results/.",
    )
    b.add_argument("--only", nargs="+", metavar="NAME", help="e.g. scores guidance distributed")
    b.add_argument("--full", action="store_true", help="full sizes instead of the quick mode")
    b.add_argument("--dir", metavar="PATH", help="the benchmarks folder (default: ./benchmarks)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rkekernels`` console script; returns the exit code.

    0 on success, 2 on bad input or usage (one line on stderr, no traceback), 1 when a benchmark
    script fails.

    Example:
        >>> from rkekernels.cli import main
        >>> main(["score", "no/such/file.npy"])
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        if args.command == "score":
            return _cmd_score(args)
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "evaluate":
            from . import evaluate

            return evaluate.main(args)
        from . import demo

        return demo.main(args)
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
