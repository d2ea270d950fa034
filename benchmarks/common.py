"""Shared benchmark plumbing: timing (median of repeats), machine facts, result files.

Every benchmark reports ratios against a baseline timed in the same process and writes rows
(machine, versions, date) to ``benchmarks/results/<name>.csv`` and a markdown table to
``benchmarks/results/<name>.md``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str]:
    """Facts that make a timing interpretable: CPU/GPU, cores, versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu}"
    return {
        "device": dev,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
    }


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds over ``repeat`` runs (after ``warmup`` runs)."""
    if torch.cuda.is_available():
        try:
            from triton.testing import do_bench

            ms = do_bench(fn, quantiles=(0.5, 0.2, 0.8))
            return float(ms[0]) / 1e3
        except Exception:
            pass
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_results(name: str, rows: list[dict], columns: list[str], title: str) -> str:
    """Write rows to results/<name>.csv (with machine facts) and a markdown table; return it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    facts = machine()
    with open(RESULTS / f"{name}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns + list(facts))
        w.writeheader()
        for r in rows:
            w.writerow({**{c: r.get(c, "") for c in columns}, **facts})
    lines = [f"### {title}", ""]
    lines.append(
        f"{facts['device']}, {facts['cores']} cores ({facts['threads']} torch threads), "
        f"torch {facts['torch']}, Python {facts['python']}, {facts['date']}."
    )
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    return md


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)
