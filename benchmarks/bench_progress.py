"""The cost of reporting progress over the tiles: one RKE pass with and without a callback.

One streamed pass of the torch tile loop (``ops.scores_torch.forward_sums`` through
`rkekernels.rke_score`, ``backend="torch"``, no gradient) on n x d float32 Gaussian data, timed
in the same process, interleaved (the order rotated every repeat), ``--repeat`` times each:

- "none": no callback (the default; the loop tests ``progress is None`` per tile);
- "count": a callback that only stores its arguments (the bare cost of a call per tile);
- "cli": `rkekernels.cli._progress.PairProgress` as ``rkekernels score --progress`` uses it,
  plain lines (every 10 s) written to an in-memory stream.

The table gives the median wall time and process CPU time of each (on a shared machine the CPU
time, one torch thread, is the less disturbed of the two) and their ratios to "none";
"call_us" is one call of the callback alone (timed apart, 100,000 calls mid-pass) and
"floor_pct" = 100 tiles call_us / the CPU time of "none": the overhead the calls themselves
add, in percent. Default n = 20,000, d = 64 (`--quick`: n = 4,000).

Run: ``python -m benchmarks.bench_progress [--quick] [--repeat 3] [--threads 1]``; writes
benchmarks/results/bench_progress.{csv,md}.
"""

from __future__ import annotations

import io
import statistics
import sys
import time

import torch

from .common import parser, write_results


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and write its table."""
    ap = parser(__doc__, "n = 4,000")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    import rkekernels
    from rkekernels.cli._progress import PairProgress
    from rkekernels.ops.pair_sums import reporting

    torch.set_num_threads(args.threads)
    n = args.n or (4_000 if args.quick else 20_000)
    dev = torch.device(args.device)
    x = torch.randn(n, args.d, generator=torch.Generator().manual_seed(0)).to(dev)
    sigma = 0.5 * args.d**0.5

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    calls: list[tuple[int, int]] = []
    variants = {
        "none": lambda: None,
        "count": lambda: lambda done, total: calls.append((done, total)),
        "cli": lambda: PairProgress(f"scoring n={n:,}", stream=io.StringIO(), bar=False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    values = {}
    with torch.no_grad():
        rkekernels.rke_score(x[:2048], sigma, backend="torch")  # warm-up (threads, allocator)
        names = list(variants)
        for r in range(args.repeat):
            for name in names[r % 3 :] + names[: r % 3]:  # rotated: no variant always first
                cb = variants[name]()
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                with reporting(cb):
                    values[name] = float(rkekernels.rke_score(x, sigma, backend="torch"))
                sync()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    assert len(set(values.values())) == 1, values  # the same number every way
    tiles = sum(1 for c in calls[: len(calls) // args.repeat] if c[0] > 0)
    call_us = {"none": 0.0}
    for name in ("count", "cli"):
        cb = variants[name]()
        cb(0, 10**12)
        t0 = time.perf_counter()
        for i in range(1, 100_001):
            cb(i, 10**12)
        call_us[name] = (time.perf_counter() - t0) / 100_000 * 1e6
    rows = []
    med = statistics.median
    for name, ts in times.items():
        rows.append(
            {
                "variant": name,
                "n": n,
                "d": args.d,
                "tiles": tiles,
                "wall_s": round(med(ts), 4),
                "wall_ratio": round(med(ts) / med(times["none"]), 4),
                "cpu_s": round(med(cpu[name]), 4),
                "cpu_ratio": round(med(cpu[name]) / med(cpu["none"]), 4),
                "call_us": round(call_us[name], 3),
                "floor_pct": 100.0 * tiles * call_us[name] * 1e-6 / med(cpu["none"]),
            }
        )
    title = f"Progress callback overhead: rke_score, torch backend, n = {n:,}, d = {args.d}"
    cols = ["variant", "n", "d", "tiles", "wall_s", "wall_ratio", "cpu_s", "cpu_ratio"]
    cols += ["call_us", "floor_pct"]
    print(write_results("bench_progress", rows, cols, title))


if __name__ == "__main__":
    main(sys.argv[1:])
