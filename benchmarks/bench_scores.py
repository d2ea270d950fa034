"""Benchmark: `rkekernels.rke_score` side by side with what users would use instead.

Run:  python -m benchmarks.bench_scores [--quick] [--backward]

1. vs one torch GEMM ``x @ x.T`` of the same x (the physical-limit proxy), n = 10,000, d = 512,
   float32 (target <= 0.7x), and vs the naive dense torch version (cdist, exp, sum), pykeops'
   LazyTensor Gaussian sum, vendi-score (order 2, eigenvalues; n <= 4,000) and the rke-score
   package's Monte Carlo estimate (RKE-MC), each where it runs, with its relative error.
2. Scaling in n at d = 64 (log-log plot), and the dense version at a size where it runs out of
   memory (a child process with a 16 GiB address-space cap, so the machine itself is safe).
3. Peak memory of `rke_score` at n = 100,000, d = 64 in a fresh process (target: input + 64 MiB),
   and extra peak memory vs n for `rke_score` and the dense version (log-log plot).

4. ``--backward`` alone: forward + backward of `rke_score` (x requires grad: the fused pass of
   ``ops.score_and_grad``) and the same through the two-pass path (forward sums, then the
   streamed backward), each vs one GEMM ``x @ x.T`` timed in the same round (n = 10,000,
   d = 512, float32, target <= 1.35x): medians of paired rounds, with the range over the rounds.
   Results: benchmarks/results/bench_scores_backward.{csv,md}.

Results: benchmarks/results/bench_scores.{csv,md} and bench_scores.png.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run by its path: python benchmarks/<name>.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rkekernels as rk
from benchmarks import baselines
from benchmarks.common import parser, run_child, save_figure, timeit, write_results
from rkekernels import reference

COLUMNS = [
    "case", "method", "n", "d", "seconds", "ratio_vs_baseline", "baseline", "rel_error",
    "extra_peak_mib",
]  # fmt: skip


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(8, d, generator=g)
    return centres[torch.randint(0, 8, (n,), generator=g)] + torch.randn(n, d, generator=g)


def head_to_head(n: int, d: int, rows: list, repeat: int) -> None:
    x = _data(n, d)
    s = rk.median_bandwidth(x)
    exact = float(rk.rke_score(x.double(), s))  # float64 path: within 1e-10 of the reference
    if n <= 2500:
        exact = float(reference.rke_score(x.double(), s))
    t_gemm = timeit(lambda: baselines.gemm(x), repeat)
    case = f"n={n}, d={d}, float32"

    def add(method, secs, value):
        err = abs(value - exact) / exact if value is not None else ""
        rows.append(
            dict(case=case, method=method, n=n, d=d, seconds=secs,
                 ratio_vs_baseline=secs / t_gemm, baseline="x @ x.T", rel_error=err)
        )  # fmt: skip

    add("torch x @ x.T (GEMM only)", t_gemm, None)
    t = timeit(lambda: rk.rke_score(x, s), repeat)
    add("rkekernels.rke_score", t, float(rk.rke_score(x, s)))
    t = timeit(lambda: rk.rke_score(x, [s, s / 2, 2 * s]), repeat)
    add("rkekernels.rke_score, 3 sigmas", t, float(rk.rke_score(x, [s, s / 2, 2 * s])[0]))
    t = timeit(lambda: rk.cond_rke_score(x, x[:, :8], s), repeat)
    rows.append(
        dict(case=case, method="rkekernels.cond_rke_score (t: 8-D)", n=n, d=d, seconds=t,
             ratio_vs_baseline=t / t_gemm, baseline="x @ x.T", rel_error="")
    )  # fmt: skip
    xg = x.clone().requires_grad_()
    t = timeit(lambda: rk.rke_score(xg, s).backward(), max(1, repeat // 2))
    rows.append(
        dict(case=case, method="rkekernels.rke_score forward+backward", n=n, d=d, seconds=t,
             ratio_vs_baseline=t / t_gemm, baseline="x @ x.T", rel_error="")
    )  # fmt: skip
    t = timeit(lambda: baselines.dense_torch(x, s), repeat)
    add("dense torch (cdist, exp, sum)", t, float(baselines.dense_torch(x, s)))
    try:
        baselines.keops(x[:100], s)  # compile once, outside the timing
        t0 = time.perf_counter()  # slow on CPU: one timed run (compiled above)
        v = baselines.keops(x, s)
        add("pykeops LazyTensor (1 run)", time.perf_counter() - t0, v)
    except Exception as exc:  # pragma: no cover - optional dependency
        print(f"pykeops skipped: {exc}")
    if n <= 4000:
        try:
            t = timeit(lambda: baselines.vendi_q2(x, s), 1, warmup=0)
            add("vendi-score q=2 (eigenvalues)", t, baselines.vendi_q2(x, s))
        except Exception as exc:  # pragma: no cover
            print(f"vendi-score skipped: {exc}")
    try:
        ns = 20_000
        t = timeit(lambda: baselines.rke_mc(x, s, ns), 1, warmup=0)
        add(f"rke-score RKE-MC ({ns:,} pairs)", t, baselines.rke_mc(x, s, ns))
    except Exception as exc:  # pragma: no cover
        print(f"rke-score skipped: {exc}")


def backward_pairs(n: int, d: int, rounds: int, rows: list) -> None:
    """Paired rounds: GEMM, fused forward+backward, two-pass forward+backward, forward alone."""
    import statistics

    from rkekernels.ops import pair_sums

    x = _data(n, d)
    s = rk.median_bandwidth(x)

    def fused():
        xg = x.clone().requires_grad_()
        rk.rke_score(xg, s, backend="torch").backward()

    def two_pass():  # the autograd Function of every other case: forward sums, streamed VJP
        xg = x.clone().requires_grad_()
        fx = pair_sums._PairSums.apply(xg, None, "torch", (s,), None, True)[0]
        (n * n / fx).backward()

    fns = {
        "torch x @ x.T (GEMM only)": lambda: baselines.gemm(x),
        "rkekernels.rke_score forward+backward (fused pass)": fused,
        "rke_score forward+backward, two passes (before)": two_pass,
        "rkekernels.rke_score forward only": lambda: rk.rke_score(x, s),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = times["torch x @ x.T (GEMM only)"]
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        rows.append(
            dict(case=f"n={n}, d={d}, float32, {torch.get_num_threads()} threads", method=name,
                 n=n, d=d, seconds=statistics.median(ts),
                 ratio_vs_baseline=statistics.median(ratios), baseline="x @ x.T",
                 rel_error="", extra_peak_mib="",
                 ratio_range=f"{min(ratios):.3g}-{max(ratios):.3g} over {rounds} rounds")
        )  # fmt: skip


def scaling(ns: list[int], d: int, rows: list) -> list[tuple[int, float, float | None]]:
    out = []
    for n in ns:
        x = _data(n, d)
        s = rk.median_bandwidth(x)
        t_rk = timeit(lambda x=x, s=s: rk.rke_score(x, s), 3 if n <= 20_000 else 1)
        t_dense = None
        if n * n * 4 * 2 <= 4 * 2**30:  # the dense version needs ~2 n^2 floats
            t_dense = timeit(lambda x=x, s=s: baselines.dense_torch(x, s), 3 if n <= 8000 else 1)
        out.append((n, t_rk, t_dense))
        rows.append(
            dict(case=f"scaling, d={d}", method="rkekernels.rke_score", n=n, d=d, seconds=t_rk,
                 ratio_vs_baseline=(t_rk / t_dense) if t_dense else "",
                 baseline="dense torch" if t_dense else "", rel_error="")
        )  # fmt: skip
        if t_dense:
            rows.append(
                dict(case=f"scaling, d={d}", method="dense torch", n=n, d=d, seconds=t_dense,
                     ratio_vs_baseline=1.0, baseline="dense torch", rel_error="")
            )  # fmt: skip
        print(f"  n={n:>7,}: rkekernels {t_rk:.3f} s, dense {t_dense}")
    return out


def dense_out_of_memory(n: int, d: int, rows: list) -> None:
    res = run_child(
        f"""
        import json, sys, time, torch
        import rkekernels as rk
        from benchmarks import baselines
        x = torch.randn({n}, {d})
        out = {{}}
        t0 = time.perf_counter(); rk.rke_score(x, 8.0); out["rk"] = time.perf_counter() - t0
        try:
            baselines.dense_torch(x, 8.0); out["dense"] = "ran"
        except (RuntimeError, MemoryError) as exc:
            out["dense"] = "out of memory: " + str(exc).splitlines()[0][:80]
        print(json.dumps(out))
        """,
        limit_gib=16,
    )
    rows.append(
        dict(case=f"n={n:,}, d={d}, 16 GiB cap", method="rkekernels.rke_score", n=n, d=d,
             seconds=res.get("rk", ""), ratio_vs_baseline="", baseline="", rel_error="")
    )  # fmt: skip
    rows.append(
        dict(case=f"n={n:,}, d={d}, 16 GiB cap", method="dense torch", n=n, d=d,
             seconds=res.get("dense", res.get("error", "")), ratio_vs_baseline="",
             baseline="", rel_error="")
    )  # fmt: skip


def _peak_child(n: int, d: int, method: str) -> dict:
    """Extra peak RSS of one call in a fresh process: VmHWM after, minus VmRSS with x allocated."""
    call = "rk.rke_score(x, 8.0)" if method == "rk" else "baselines.dense_torch(x, 8.0)"
    return run_child(
        f"""
        import json, sys, torch, rkekernels as rk
        from benchmarks import baselines
        def status(key):  # /proc/self/status, MiB: VmRSS now, VmHWM peak of this process
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith(key)) / 1024.0
        rk.rke_score(torch.randn(8, {d}), 1.0)   # warm up: threads and code, not memory
        baselines.dense_torch(torch.randn(8, {d}), 1.0)
        x = torch.randn({n}, {d})
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS (ru_maxrss would include the parent)
        base = status("VmRSS")
        v = float({call})
        extra = status("VmHWM") - base
        print(json.dumps(dict(extra_mib=extra, input_mib=x.numel() * 4 / 2**20, value=v)))
        """
    )


def peak_memory(n: int, d: int, rows: list) -> dict:
    res = _peak_child(n, d, "rk")
    rows.append(
        dict(case=f"peak memory n={n:,}, d={d}", method="rkekernels.rke_score", n=n, d=d,
             seconds=f"input {res.get('input_mib', 0):.1f} MiB + "
                     f"{res.get('extra_mib', float('nan')):.1f} MiB extra peak RSS",
             ratio_vs_baseline="", baseline="target: input + 64 MiB", rel_error="",
             extra_peak_mib=res.get("extra_mib", ""))
    )  # fmt: skip
    return res


def memory_scaling(ns: list[int], d: int, rows: list, dense_max: int = 16_000) -> list:
    """Extra peak memory vs n for rke_score and (where it fits) the dense version."""
    out = []
    for n in ns:
        rk_mib = _peak_child(n, d, "rk").get("extra_mib")
        de_mib = _peak_child(n, d, "dense").get("extra_mib") if n <= dense_max else None
        out.append((n, rk_mib, de_mib))
        for method, mib in (("rkekernels.rke_score", rk_mib), ("dense torch", de_mib)):
            if mib is not None:
                rows.append(
                    dict(case=f"memory scaling, d={d}", method=method, n=n, d=d, seconds="",
                         ratio_vs_baseline="", baseline="", rel_error="", extra_peak_mib=mib)
                )  # fmt: skip
        print(f"  n={n:>7,}: extra peak MiB rkekernels {rk_mib}, dense {de_mib}")
    return out


def plot(points: list, mem: list, d: int) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    ax.loglog([p[0] for p in points], [p[1] for p in points], "o-", label="rkekernels.rke_score")
    dense = [(p[0], p[2]) for p in points if p[2]]
    if dense:
        ax.loglog(*zip(*dense), "s--", label="dense torch (cdist, exp, sum)")
    ax.set(xlabel="n (samples)", ylabel="seconds", title=f"time, d = {d}, float32, CPU")
    ax_m.loglog([p[0] for p in mem if p[1]], [p[1] for p in mem if p[1]], "o-",
                label="rkekernels.rke_score")  # fmt: skip
    dm = [(p[0], p[2]) for p in mem if p[2]]
    if dm:
        ax_m.loglog(*zip(*dm), "s--", label="dense torch (cdist, exp, sum)")
    ax_m.set(xlabel="n (samples)", ylabel="extra peak memory, MiB",
             title=f"memory above the input, d = {d}")  # fmt: skip
    for a in (ax, ax_m):
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    return save_figure(fig, "bench_scores.png")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--backward", action="store_true", help="only the forward+backward rounds")
    ap.add_argument("--rounds", type=int, default=7, help="paired rounds for --backward")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for --backward")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows: list[dict] = []
    if args.backward:
        if args.threads:
            torch.set_num_threads(args.threads)
        n, d = (2000, 128) if args.quick else (10_000, 512)
        backward_pairs(n, d, 2 if args.quick else args.rounds, rows)
        md = write_results(
            "bench_scores_backward" + ("_quick" if args.quick else ""),
            rows,
            [*COLUMNS, "ratio_range"],
            "rke_score forward + backward vs one GEMM (medians of paired rounds)",
        )
        print(md)
        return
    if args.quick:
        head_to_head(2000, 128, rows, repeat=2)
        pts = scaling([500, 2000], 64, rows)
        mem = peak_memory(20_000, 64, rows)
    else:
        head_to_head(10_000, 512, rows, repeat=5)
        head_to_head(4000, 512, rows, repeat=3)
        pts = scaling([1000, 4000, 16_000, 32_000, 100_000], 64, rows)
        dense_out_of_memory(100_000, 64, rows)
        mem = peak_memory(100_000, 64, rows)
        mem_pts = memory_scaling([1000, 4000, 16_000, 32_000, 100_000], 64, rows)
    md = write_results(
        "bench_scores" if not args.quick else "bench_scores_quick",
        rows,
        COLUMNS,
        "rke_score vs the alternatives (median wall time; ratio < 1 is faster than the baseline)",
    )
    if not args.quick:
        plot(pts, mem_pts, 64)
    print(md)
    if "extra_mib" in mem and math.isfinite(mem["extra_mib"]):
        print(f"peak memory: input {mem['input_mib']:.1f} MiB + {mem['extra_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
