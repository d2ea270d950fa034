"""Shared benchmark plumbing: machine facts, timing, result files, child processes, spawned ranks.

The only plumbing of the benchmark scripts and of ``gpu_check`` (which runs on a GPU machine that
has nothing beyond torch, Triton and numpy: this module needs no more). Every benchmark reports
ratios against a baseline timed in the same process and writes rows (machine, versions, date) to
``benchmarks/results/<name>.csv`` and a markdown table to ``benchmarks/results/<name>.md``.
Run a script from the repository root as ``python -m benchmarks.<name>`` (or by its path).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, str]:
    """Facts that make a timing interpretable: CPU/GPU, cores, versions, date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        dev = f"CPU: {cpu}, Triton interpreter"
    else:
        dev = f"CPU: {cpu}"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed
        triton_version = "none"
    return {
        "device": dev,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def bench(
    fn: Callable[[], object], cuda: bool, rep_ms: int = 100, repeat: int = 5, warmup: int = 1
) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds: ``triton.testing.do_bench`` on CUDA, else the quantiles
    of ``repeat`` runs after ``warmup`` runs."""
    if cuda:
        from triton.testing import do_bench

        q = do_bench(fn, warmup=10, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    lo, hi = int(0.2 * (repeat - 1) + 0.5), int(0.8 * (repeat - 1) + 0.5)
    return statistics.median(times), times[lo], times[hi]


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds over ``repeat`` runs (after ``warmup`` runs); on CUDA
    ``triton.testing.do_bench`` where Triton imports."""
    cuda = torch.cuda.is_available()
    if cuda:
        try:
            return bench(fn, True)[0] / 1e3
        except Exception:  # no Triton: time on the host, synchronised
            pass
    return bench(fn, False, repeat=repeat, warmup=warmup)[0] / 1e3


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fmt(v: Any) -> str:
    """A table cell: 4 significant digits, scientific outside [1e-3, 1e5), NaN as empty."""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


class Report:
    """Rows of one benchmark, written to ``<out>/<name>.csv`` (each row with the machine facts)
    and ``<out>/<name>.md`` after every addition (a run cut short keeps what it measured)."""

    def __init__(
        self,
        out: Path,
        name: str,
        title: str,
        columns: Sequence[str],
        notes: Sequence[str] = (),
        facts: dict[str, str] | None = None,
        echo: bool = False,
    ):
        self.out, self.name, self.title = Path(out), name, title
        self.columns = list(columns)
        self.notes = list(notes)
        self.facts = facts if facts is not None else machine()
        self.echo = echo
        self.rows: list[dict] = []
        self.extra: list[str] = []
        self.out.mkdir(parents=True, exist_ok=True)

    def add(self, **row) -> dict:
        self.rows.append(row)
        if self.echo:
            shown = {k: fmt(v) for k, v in row.items() if v not in (None, "")}
            print("  " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        self.flush()
        return row

    def markdown(self) -> str:
        f = self.facts
        lines = [
            f"### {self.title}",
            "",
            f"{f['device']}, {f['cores']} cores ({f['threads']} torch threads), torch "
            f"{f['torch']} (CUDA {f['cuda']}), Triton {f['triton']}, Python {f['python']}, "
            f"{f['date']}.",
        ]
        if self.notes:
            lines += ["", *[f"- {note}" for note in self.notes]]
        lines += ["", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.rows:
            cells = [fmt(r.get(c, "")).replace("|", "\\|") for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        if self.extra:
            lines += ["", *self.extra]
        return "\n".join(lines) + "\n"

    def flush(self) -> None:
        with open(self.out / f"{self.name}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns + list(self.facts))
            w.writeheader()
            for r in self.rows:
                w.writerow({**{c: fmt(r.get(c, "")) for c in self.columns}, **self.facts})
        (self.out / f"{self.name}.md").write_text(self.markdown())


def parser(doc: str, quick: str | None = "small sizes (a smoke run)") -> argparse.ArgumentParser:
    """A benchmark script's argument parser: described by the first line of its docstring
    ``doc``, with ``--quick`` (whose help is ``quick``; None: no such option)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def save_figure(fig: Any, name: str, rect: Sequence[float] | None = None) -> Path:
    """Lay ``fig`` out (within ``rect`` of the figure), write it to results/``name`` at 110 dpi
    and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    path = RESULTS / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(name: str, rows: list[dict], columns: list[str], title: str) -> str:
    """Write rows to results/<name>.csv (with machine facts) and a markdown table; return it."""
    rep = Report(RESULTS, name, title, columns)
    rep.rows = list(rows)
    rep.flush()
    return rep.markdown()


# --------------------------------------------------------------------------- child processes


def run_child(code: str, limit_gib: float | None = None) -> dict:
    """Run ``code`` in a fresh Python (repository root on sys.path); it prints one JSON line as
    its last line, returned as a dict (or {"error": the last line of stderr})."""
    pre = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    if limit_gib:
        pre += (
            f"import resource; lim = int({limit_gib} * 2**30); "
            "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
        )
    out = subprocess.run(
        [sys.executable, "-c", pre + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def spawn_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple = (),
    *,
    init: bool = True,
    threads: int = 1,
    timeout_s: float = 60.0,
) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` fresh processes, with a gloo process group
    (file:// init) when ``init``; returns their results in rank order.

    The processes are forked from a forkserver (torch.multiprocessing) that has imported torch and
    ``fn``'s module once: a clean interpreter like spawn's, without paying the imports (~1.5 s)
    again in every rank of every call. ``fn`` must be importable by name (a module-level
    function); its result is saved with ``torch.save`` by each rank and loaded here.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload([fn.__module__, __name__])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_entry,
            args=(fn, world, args, init, threads, timeout_s, tmp),
            nprocs=world,
            join=True,
            start_method="forkserver",
        )
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank_entry(rank, fn, world, args, init, threads, timeout_s, tmp) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if init:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(tmp, 'init')}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    try:
        res = fn(rank, world, *args)
        if init:
            dist.barrier()
    finally:
        if init:
            dist.destroy_process_group()
    torch.save(res, os.path.join(tmp, f"rank{rank}.pt"))
