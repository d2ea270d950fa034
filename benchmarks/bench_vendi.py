"""Benchmark: order-q scores (`rkekernels.vendi_score`) against vendi-score and the GEMM floor.

Run:  python -m benchmarks.bench_vendi [--quick]

1. Exact order 1, n = 4,000, d = 64: vs ``vendi.score_K`` on a precomputed K (the eigensolver is
   the floor; target <= 1.2x) and vs ``vendi.score(X, k)`` end to end with a Gaussian k written
   as a Python function of two samples, as in its README (target >= 10x faster).
2. Exact order 1 at n = 10,000 (time and extra peak memory in a fresh process).
3. Cosine kernel through the covariance, n = 1,000,000, d = 768, float32: vs one ``x.T @ x``
   (target <= 2x); extra peak memory in a fresh process at n = 200,000.
4. RFF Gaussian, d = 768, D = 4,096 (``--rff-n``, 1,000,000 by default; ``--rounds``): the
   streamed covariance vs the work it cannot avoid (the projection GEMM and one Z.T @ Z, in the
   same row blocks; target <= 1.5x), and up to n = 200,000 the whole score with its eigensolver.
5. RFF against exact: relative error vs D for q = 1 and 2 at the default bandwidth, on
   scikit-learn's digits (1,797 x 64) and a synthetic 10-cluster mixture (2,000 x 16), median
   over 3 seeds; plot ``bench_vendi_rff.png``.
6. Flat spectra (issue 22): digits at sigma = 20 and at `default_bandwidth`, digits + N(0, 0.5^2)
   noise to 6,000 rows at sigma = 20, the 10-cluster mixture at its default (V_1 = 40) and at
   sigma = 20 (one dominant eigenvalue): rff (D = 1,024 / 4,096 / 8,192), nystrom (1,024),
   lanczos (top 100) and method="auto" against exact, q = 1, 2, inf, 2 seeds; the error model
   of `rkekernels._approx_error` beside each (``--quick``: digits at sigma = 20, D = 1,024).

Timings: paired rounds (ours, then the baseline, in the same round), the ratio is the median of
the per-round ratios (a load that changes between rounds cancels). Results in
benchmarks/results/bench_vendi.{csv,md} and bench_vendi_rff.png.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run by its path: python benchmarks/bench_vendi.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rkekernels as rk
from benchmarks import baselines
from benchmarks.common import RESULTS, parser, run_child, save_figure, write_results
from rkekernels import reference
from rkekernels.ops import spectra

COLUMNS = [
    "case", "method", "n", "d", "seconds", "baseline", "baseline_seconds", "ratio", "value",
    "rel_error", "extra_peak_mib", "note",
]  # fmt: skip

_bandwidth = getattr(rk, "default_bandwidth", rk.median_bandwidth)

TITLE = "Order-q scores (median of paired rounds)"
#: section -> the start of its rows' "case"
SECTIONS = {
    "exact": "exact order 1, n=4,000",
    "large": "exact order 1, n=10,000",
    "cosine": "cosine",
    "rff": "RFF covariance",
    "rff_score": "RFF score",
    "curve": "RFF vs exact",
    "flat": "flat spectrum",
}


def _section(case: str) -> str:
    hit = [k for k, v in SECTIONS.items() if case.startswith(v)]
    return "rff" if hit == ["rff_score"] else hit[0]


def _old_rows() -> list[dict]:
    path = RESULTS / "bench_vendi.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{c: r[c] for c in COLUMNS} for r in csv.DictReader(fh)]


def _mixture(n: int, d: int, k: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, d, generator=g)
    return centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _secs(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def paired(ours, base, rounds: int) -> tuple[float, float, float, object, object]:
    """(median ours s, median baseline s, median per-round ratio, last values)."""
    to, tb, ratios = [], [], []
    vo = vb = None
    for _ in range(rounds):
        a, vo = _secs(ours)
        b, vb = _secs(base)
        to.append(a)
        tb.append(b)
        ratios.append(a / b)
    return statistics.median(to), statistics.median(tb), statistics.median(ratios), vo, vb


def exact_order1(n: int, d: int, rows: list, rounds: int, loop: bool) -> None:
    x = _mixture(n, d).double()
    s = _bandwidth(x)
    K = reference.kernel_matrix(x, "gaussian", s).numpy()
    t_o, t_b, ratio, v_o, v_b = paired(
        lambda: float(rk.vendi_score(x, 1.0, s, method="exact")),
        lambda: baselines.vendi_score_K(K),
        rounds,
    )
    err = abs(v_o - v_b) / v_b
    rows.append(dict(case=f"exact order 1, n={n:,}", method="vendi_score(x) end to end", n=n,
                     d=d, seconds=t_o, baseline="vendi.score_K(K), K precomputed",
                     baseline_seconds=t_b, ratio=ratio, value=v_o, rel_error=err,
                     note="target <= 1.2x"))  # fmt: skip
    print(f"exact n={n}: ours {t_o:.2f}s, score_K {t_b:.2f}s, ratio {ratio:.3f}, err {err:.2e}")
    if loop:
        t_l, v_l = _secs(lambda: baselines.vendi_loop(x, s))
        rows.append(dict(case=f"exact order 1, n={n:,}", method="vendi_score(x) end to end",
                         n=n, d=d, seconds=t_o, baseline="vendi.score(X, k), Python Gaussian k",
                         baseline_seconds=t_l, ratio=t_o / t_l, value=v_o,
                         rel_error=abs(v_o - v_l) / v_l,
                         note=f"{t_l / t_o:.1f}x faster (target >= 10x), one run"),
                    )  # fmt: skip
        print(f"  vendi.score loop {t_l:.1f}s: {t_l / t_o:.1f}x slower")


def exact_large(n: int, d: int, rows: list) -> None:
    res = run_child(
        f"""
        import json, time, torch, rkekernels as rk
        from benchmarks.bench_vendi import _mixture, _bandwidth
        def status(key):
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith(key)) / 1024.0
        x = _mixture({n}, {d})
        s = _bandwidth(x)
        rk.vendi_score(x[:64], 1.0, s, method="exact")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = status("VmRSS")
        t0 = time.perf_counter()
        v = float(rk.vendi_score(x, 1.0, s, method="exact"))
        secs = time.perf_counter() - t0
        print(json.dumps(dict(secs=secs, value=v, extra_mib=status("VmHWM") - base)))
        """
    )
    rows.append(dict(case=f"exact order 1, n={n:,}", method="vendi_score(x, method='exact')",
                     n=n, d=d, seconds=res.get("secs", ""), value=res.get("value", ""),
                     extra_peak_mib=res.get("extra_mib", ""),
                     note=f"K alone is {8 * n * n / 2**20:,.0f} MiB (float64) "
                          f"{res.get('error', '')}"))  # fmt: skip
    print(f"exact n={n}: {res}")


def cosine_large(n: int, d: int, rows: list, rounds: int, mem_n: int) -> None:
    x = torch.randn(n, d)
    x[: n // 2] += 0.5
    t_o, t_b, ratio, v_o, _ = paired(
        lambda: float(rk.vendi_score(x, 1.0, kernel="cosine", method="covariance")),
        lambda: baselines.cov_gemm(x),
        rounds,
    )
    sub = x[:4000].double()
    err = abs(float(rk.vendi_score(sub, 1.0, kernel="cosine", method="covariance"))
              - float(reference.vendi_score(sub, 1.0, None, "cosine")))  # fmt: skip
    x = sub = None  # free 3 GB before the memory child starts
    res = run_child(
        f"""
        import json, torch, rkekernels as rk
        def status(key):
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith(key)) / 1024.0
        rk.vendi_score(torch.randn(64, {d}), 1.0, kernel="cosine", method="covariance")
        x = torch.randn({mem_n}, {d})
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = status("VmRSS")
        rk.vendi_score(x, 1.0, kernel="cosine", method="covariance")
        print(json.dumps(dict(extra_mib=status("VmHWM") - base)))
        """
    )
    rows.append(dict(case=f"cosine via covariance, n={n:,}", method="vendi_score(kernel='cosine')",
                     n=n, d=d, seconds=t_o, baseline="one x.T @ x (float32)", baseline_seconds=t_b,
                     ratio=ratio, value=v_o, rel_error=err / 1.0,
                     extra_peak_mib=res.get("extra_mib", ""),
                     note=f"target <= 2x; abs error vs reference at n=4,000: {err:.1e}; "
                          f"memory at n={mem_n:,}"))  # fmt: skip
    print(f"cosine n={n}: ours {t_o:.2f}s, x.T@x {t_b:.2f}s, ratio {ratio:.3f}; mem {res}")


#: rff_large times the whole vendi_score call up to this n (beyond, the covariance rows only)
SCORE_MAX_N = 200_000


def rff_large(n: int, d: int, dim: int, rows: list, rounds: int) -> None:
    x = _mixture(n, d)
    s = _bandwidth(x)
    u = (x - x.mean(0)) / s
    w = torch.randn(d, dim // 2)
    blocks = spectra.row_blocks(n, dim)
    z = torch.randn(max(i1 - i0 for i0, i1 in blocks), dim)

    def ours_cov():
        return spectra.covariance(spectra.rff_map(u, dim, 0), n, dim, u.device, u.dtype)

    t_o, t_b, ratio, _, _ = paired(ours_cov, lambda: baselines.rff_floor(u, w, z, blocks), rounds)
    rows.append(dict(case=f"RFF covariance, n={n:,}, D={dim}", method="streamed Z^T Z (cos, sin)",
                     n=n, d=d, seconds=t_o, baseline="x @ W + one Z.T @ Z, same row blocks",
                     baseline_seconds=t_b, ratio=ratio,
                     note=f"target <= 1.5x; {len(blocks)} blocks, rounds: {rounds}"))  # fmt: skip
    msg = f"rff n={n} D={dim}: cov {t_o:.2f}s, floor {t_b:.2f}s, ratio {ratio:.3f}"
    if n <= SCORE_MAX_N:  # the whole score: one more pass over the data, and the eigensolver
        t_all, v = _secs(lambda: float(rk.vendi_score(x, 1.0, s, method="rff", dim=dim)))
        rows.append(dict(case=f"RFF score, n={n:,}, D={dim}", method="vendi_score(method='rff')",
                         n=n, d=d, seconds=t_all, value=v,
                         note=f"includes the {dim} x {dim} float64 eigvalsh"))  # fmt: skip
        msg += f"; all {t_all:.1f}s"
    print(msg, flush=True)


def rff_curve(dims: list[int], seeds: int, rows: list) -> list[tuple]:
    from sklearn.datasets import load_digits

    sets = {
        "digits (1,797 x 64)": torch.as_tensor(load_digits().data, dtype=torch.float64),
        "mixture (2,000 x 16)": _mixture(2000, 16).double(),
    }
    curve = []
    for name, x in sets.items():
        s = _bandwidth(x)
        for q in (1.0, 2.0):
            exact = float(reference.vendi_score(x, q, s))
            for dim in dims:
                errs = [
                    abs(float(rk.vendi_score(x, q, s, method="rff", dim=dim, seed=k)) - exact)
                    / exact
                    for k in range(seeds)
                ]
                med = statistics.median(errs)
                curve.append((name, q, dim, med))
                rows.append(dict(case=f"RFF vs exact, {name}", method=f"rff q={q:g}", n=len(x),
                                 d=x.shape[1], value=exact, rel_error=med,
                                 note=f"D={dim}, median of {seeds} seeds, sigma={s:.4g}"),
                            )  # fmt: skip
                print(f"  {name} q={q:g} D={dim}: exact {exact:.4f}, median rel error {med:.2e}")
    return curve


def _flat_sets(quick: bool) -> list[tuple[str, torch.Tensor, float]]:
    import numpy as np
    from sklearn.datasets import load_digits

    digits = torch.as_tensor(load_digits().data, dtype=torch.float64)
    if quick:
        return [("digits", digits, 20.0)]
    g = np.random.default_rng(0)
    aug = digits[g.integers(0, len(digits), 6000)]
    aug = aug + torch.as_tensor(g.normal(0.0, 0.5, aug.shape))
    mix = _mixture(2000, 16).double()
    return [
        ("digits", digits, 20.0),
        ("digits", digits, _bandwidth(digits)),
        ("digits + noise", aug, 20.0),
        ("mixture", mix, _bandwidth(mix)),
        ("mixture", mix, 20.0),
    ]


def _vendis(p: torch.Tensor, tail=0.0, count: int = 0) -> list[float]:
    return [float(spectra.renyi_entropy(p, q, tail, count).exp()) for q in FLAT_QS]


FLAT_QS = (1.0, 2.0, math.inf)


def _flat_spectrum(u: torch.Tensor, method: str, dim: int, seed: int) -> list[float]:
    """Vendi_q (q in FLAT_QS) of the unit-bandwidth data u by one method: one spectrum."""
    from rkekernels.ops import kernel_entropy as ke

    n = u.shape[0]
    if method == "exact":
        k = spectra.gaussian_gram(u)
        return _vendis(torch.linalg.eigvalsh(k) / torch.trace(k))
    if method == "lanczos":
        vals, _ = spectra.lanczos_top(u, dim)
        p = torch.as_tensor(vals.copy(), dtype=torch.float64) / n
        return _vendis(p, (1.0 - p.sum()).clamp(min=0.0), n - len(vals))
    view = ke.View("gaussian", ((u, 1.0),))
    dim = min(dim, n) if method == "nystrom" else dim
    cov = ke.feature_cov(view, method, {"dim": dim, "seed": seed})
    return _vendis(spectra.spectrum_of_cov(cov))


def flat_cases(rows: list, quick: bool) -> None:
    """Approximations against exact on flat spectra, with the modelled error beside each."""
    from rkekernels import _approx_error as ae

    cfgs = [("rff", 1024)]
    if not quick:
        cfgs += [("rff", 4096), ("rff", 8192), ("nystrom", 1024), ("lanczos", 100)]
    for name, x, s in _flat_sets(quick):
        n, u = len(x), (x - x.mean(0)) / s
        t_ex, exact = _secs(lambda u=u: _flat_spectrum(u, "exact", 0, 0))
        case = f"flat spectrum, {name} ({n:,} x {x.shape[1]}), sigma={s:.4g}"
        for q, v in zip(FLAT_QS, exact):
            rows.append(dict(case=case, method="exact", n=n, d=x.shape[1], seconds=t_ex, value=v,
                             note=f"q={q:g}; one eigvalsh for all q; V/n={v / n:.3f}"))  # fmt: skip
        print(f"{case}: exact {[round(v, 2) for v in exact]} in {t_ex:.1f}s", flush=True)
        for method, dim in cfgs:
            seeds = (0,) if method == "lanczos" or quick else (0, 1)
            runs = [
                _secs(lambda k=k, m=method, d=dim, u=u: _flat_spectrum(u, m, d, k)) for k in seeds
            ]
            secs = statistics.median(r[0] for r in runs)
            for i, q in enumerate(FLAT_QS):
                errs = [r[1][i] / exact[i] - 1.0 for r in runs]
                base = exact[0] if method == "nystrom" else exact[i]
                model = (ae.expected_rel_error(method, q, base, dim, n)
                         if method != "lanczos" else float("nan"))  # fmt: skip
                rows.append(dict(case=case, method=f"{method} D={dim}", n=n, d=x.shape[1],
                                 seconds=secs, value=statistics.mean(r[1][i] for r in runs),
                                 rel_error=statistics.mean(errs),
                                 note=f"q={q:g}; seeds {', '.join(f'{e:+.3f}' for e in errs)}; "
                                      f"model {model:+.3f}"))  # fmt: skip
            print(f"  {method} D={dim}: {secs:.1f}s", flush=True)
        for q, v in zip(FLAT_QS, exact):
            t_a, a = _secs(lambda q=q, x=x, s=s: float(rk.vendi_score(x, q, s)))
            rows.append(dict(case=case, method="auto", n=n, d=x.shape[1], seconds=t_a, value=a,
                             rel_error=a / v - 1.0, note=f"q={q:g}; target within 5%"))  # fmt: skip


def plot_curve(curve: list[tuple]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(c[0] for c in curve):
        for q, style in ((1.0, "o-"), (2.0, "s--")):
            pts = [(c[2], c[3]) for c in curve if c[0] == name and c[1] == q]
            ax.loglog(*zip(*pts), style, label=f"{name}, q = {q:g}")
    dims = sorted({c[2] for c in curve})
    ax.set_xticks(dims, [str(v) for v in dims])
    ax.minorticks_off()
    ax.axhline(0.01, color="grey", lw=0.8, ls=":", label="1%")
    ax.set(xlabel="RFF dimension D", ylabel="relative error of Vendi_q",
           title="RFF vs exact (default bandwidth, median of 3 seeds)")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, "bench_vendi_rff.png")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--cosine-n", type=int, default=1_000_000)
    ap.add_argument("--rff-n", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--only",
        nargs="+",
        choices=[k for k in SECTIONS if k != "rff_score"],
        help="rerun these sections, keep the other rows",
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows: list[dict] = []
    if args.only:
        rows = [r for r in _old_rows() if _section(r["case"]) not in args.only]
        run = set(args.only)
        if "exact" in run:
            exact_order1(4000, 64, rows, args.rounds, loop=True)
        if "large" in run:
            exact_large(10_000, 64, rows)
        if "cosine" in run:
            cosine_large(args.cosine_n, 768, rows, args.rounds, mem_n=200_000)
        if "rff" in run:
            rff_large(args.rff_n, 768, 4096, rows, args.rounds)
        if "curve" in run:
            plot_curve(rff_curve([256, 512, 1024, 2048, 4096, 8192], 3, rows))
        if "flat" in run:
            flat_cases(rows, quick=False)
        rows.sort(key=lambda r: list(SECTIONS).index(_section(r["case"])))
        print(write_results("bench_vendi", rows, COLUMNS, TITLE))
        return
    if args.quick:
        exact_order1(500, 16, rows, 2, loop=True)
        cosine_large(20_000, 64, rows, 2, mem_n=20_000)
        rff_large(2000, 32, 512, rows, 2)
        curve = rff_curve([256, 1024], 2, rows)
        flat_cases(rows, quick=True)
    else:
        exact_order1(4000, 64, rows, args.rounds, loop=True)
        exact_large(10_000, 64, rows)
        cosine_large(args.cosine_n, 768, rows, args.rounds, mem_n=200_000)
        rff_large(args.rff_n, 768, 4096, rows, args.rounds)
        curve = rff_curve([256, 512, 1024, 2048, 4096, 8192], 3, rows)
        flat_cases(rows, quick=False)
    name = "bench_vendi_quick" if args.quick else "bench_vendi"
    md = write_results(name, rows, COLUMNS, TITLE)
    if not args.quick:
        plot_curve(curve)
    print(md)


if __name__ == "__main__":
    main()
