"""Plots of the benchmark results, drawn from the committed CSV rows (no timing here).

Run:  python -m benchmarks.plots        (after the benchmarks; then benchmarks/render_docs.py)

One figure per benchmark, written next to its data in benchmarks/results/:

- bench_scores_ratios.png: rke_score and the alternatives as ratios to one GEMM ``x @ x.T``
  (n = 10,000, d = 512), log scale. (bench_scores.py itself draws time vs n, log-log.)
- bench_guidance.png: time and extra memory vs bank size n (D = 768), log-log, for
  guidance_grad, one GEMM over the bank and the original algorithm.
- bench_distributed.png: wall time and CPU time per rank vs the number of processes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.common import RESULTS, save_figure

PAGE_MIB = 4 / 1024  # the resolution of the peak-memory measurement (VmHWM, one page)


def _rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _num(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _foot(ax, row: dict) -> None:
    ax.figure.text(
        0.01, 0.01, f"{row.get('device', '')}, torch {row.get('torch', '')}, {row.get('date', '')}",
        fontsize=7, color="0.4",
    )  # fmt: skip


def scores_ratios() -> Path | None:
    rows = [r for r in _rows("bench_scores") if r["case"].startswith("n=10000")]
    rows = [r for r in rows if _num(r["ratio_vs_baseline"])]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["method"] for r in rows]
    vals = [float(r["ratio_vs_baseline"]) for r in rows]
    colors = ["tab:blue" if m.startswith("rkekernels") else "0.6" for m in names]
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("time / time of one GEMM x @ x.T (log scale; < 1 is faster)")
    ax.set_title(rows[0]["case"], fontsize=10)
    ax.invert_yaxis()
    _foot(ax, rows[0])
    return save_figure(fig, "bench_scores_ratios.png", rect=(0, 0.04, 1, 1))


def guidance() -> Path | None:
    rows = [r for r in _rows("bench_guidance") if r["case"].startswith("scaling")]
    if not rows:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.8))
    for (method, style), color in zip(
        [("guidance_grad, FeatureBank", "o-"), ("bank @ z.T", "s--"), ("ORIGINAL algorithm", "^:")],
        ["tab:blue", "tab:orange", "tab:green"],
    ):
        # the GEMM row is named after whichever layout was faster at that n
        names = {"bank @ z.T", "z @ bank.T"} if method == "bank @ z.T" else {method}
        pts = [(int(r["n"]), float(r["seconds"]), _num(r["extra_mib"])) for r in rows
               if r["method"] in names]  # fmt: skip
        if not pts:
            continue
        ax_t.loglog([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=method)
        # a peak below the resolution (one 4 KiB page) reads 0: drawn at one page (log scale)
        mem = [(p[0], max(p[2], PAGE_MIB)) for p in pts if p[2] is not None]
        if mem:
            ax_m.loglog(*zip(*mem), style, color=color, label=method)
    ax_t.set(xlabel="bank size n", ylabel="seconds per call (b = 4)", title="time, D = 768")
    ax_m.set(xlabel="bank size n", ylabel="extra peak memory, MiB (floor: 4 KiB)",
             title="memory, D = 768")  # fmt: skip
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _foot(ax_t, rows[0])
    return save_figure(fig, "bench_guidance.png", rect=(0, 0.05, 1, 1))


def distributed() -> Path | None:
    rows = _rows("bench_distributed")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    labels = [f"{r['config']}\nP={r['P']}, {r['threads_per_rank']} thr/rank" for r in rows]
    wall = [float(r["seconds"]) for r in rows]
    cpu = [max(float(v) for v in r["cpu_seconds_per_rank"].split("/")) for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], wall, width=0.4, label="wall time")
    ax.bar([i + 0.2 for i in x], cpu, width=0.4, label="CPU time per rank (max)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("distributed rke_score, n = 40,000, d = 256", fontsize=10)
    ax.legend(fontsize=8)
    _foot(ax, rows[0])
    return save_figure(fig, "bench_distributed.png", rect=(0, 0.05, 1, 1))


def main() -> None:
    for fn in (scores_ratios, guidance, distributed):
        path = fn()
        print(f"{fn.__name__}: {path or 'no data'}")


if __name__ == "__main__":
    main()
