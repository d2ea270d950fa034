"""``rkekernels bench``: run the benchmark scripts of a checkout and print their tables.

    rkekernels bench [--only NAME ...] [--full] [--dir PATH]

Runs benchmarks/bench_*.py (quick mode unless --full) with this Python and prints the markdown
tables they write to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .._errors import CLIError

__all__ = ["BENCH_SCRIPTS", "add_arguments", "run"]

BENCH_SCRIPTS = (
    "bench_scores.py",
    "bench_guidance.py",
    "bench_distributed.py",
    "bench_vendi.py",
)
HELP = "run the benchmark scripts and print their tables"
DESCRIPTION = (
    "Run benchmarks/bench_*.py (quick mode unless --full) with this Python and "
    "print the markdown tables they write to benchmarks/results/."
)


def add_arguments(b: argparse.ArgumentParser) -> None:
    """The options of ``rkekernels bench``."""
    b.add_argument("--only", nargs="+", metavar="NAME", help="e.g. scores guidance distributed")
    b.add_argument("--full", action="store_true", help="full sizes instead of the quick mode")
    b.add_argument("--dir", metavar="PATH", help="the benchmarks folder (default: ./benchmarks)")


def _bench_dir(given: str | None) -> Path | None:
    if given:
        return Path(given)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "benchmarks").is_dir():
            return base / "benchmarks"
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``rkekernels bench``: 0 when every script ran, 1 when one failed."""
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
        ran += 1
        if not _run_script(name, bdir, args.full):
            failed.append(name)
    if ran == 0:
        raise CLIError(f"none of {', '.join(names)} exists in {bdir}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_script(name: str, bdir: Path, full: bool) -> bool:
    """Run bdir/name (--quick unless ``full``) and print its tables; False when it failed."""
    script = bdir / name
    cmd = [sys.executable, str(script)]
    source = script.read_text(errors="replace")
    if not full and "--quick" in source:
        cmd.append("--quick")
    print(f"[bench] running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    started = time.time()
    proc = subprocess.run(cmd, cwd=str(bdir.parent), stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"[bench] {name} failed with exit code {proc.returncode}", file=sys.stderr)
        if proc.stdout:
            print(proc.stdout, end="")
        return False
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
    return True
