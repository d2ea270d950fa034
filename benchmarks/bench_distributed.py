"""Benchmark: `rkekernels.distributed.rke_score` with P = 1 and 2 processes on this machine.

Run:  python -m benchmarks.bench_distributed [--n 40000] [--d 256] [--reps 2] [--rounds 2]

Every configuration runs in fresh processes (torch.multiprocessing, forked from a forkserver;
gloo, file:// init), so each rank's peak RSS is its own. Configurations, all on the same float32
data (n = 40,000, d = 256 by default, generated in fixed-seed row chunks so every rank builds only
its own shard):

- one process, `rkekernels.rke_score`, 1 torch thread: the baseline;
- one process, 2 torch threads;
- `rkekernels.distributed.rke_score`, P = 1 (1 thread): the cost of the gather path alone;
- `rkekernels.distributed.rke_score`, P = 2 ranks x 1 thread (fair against 1 x 2 threads).

Reported per configuration: wall time (median over interleaved rounds x repeats; for P = 2 the
slower rank of each repeat, every repeat starting after a barrier), the ratio to the baseline
timed in the same run, the CPU time of each rank (process time: the work done, which contention
with other jobs inflates much less than the wall time), the machine's 1-minute load average when
the configuration started,
per-rank peak RSS and its growth during the calls, the bytes each rank received through
all_gather and sent to all_reduce, and the relative difference of the score to the baseline.
Also the share of kernel pairs each rank reduces under the round-robin tile split.

Results: benchmarks/results/bench_distributed.{csv,md}.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run by its path: python benchmarks/<name>.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parser, spawn_ranks, write_results
from rkekernels.ops import scores_torch

SIGMA = 16.0
CHUNK = 1000
COLUMNS = [
    "config",
    "P",
    "threads_per_rank",
    "seconds",
    "min_max_seconds",
    "cpu_seconds_per_rank",
    "ratio_vs_baseline",
    "load_avg_1min",
    "peak_rss_mib_per_rank",
    "rss_growth_mib_per_rank",
    "input_mib_per_rank",
    "all_gather_mib_per_rank",
    "all_reduce_bytes",
    "rel_diff_vs_baseline",
]


def _rows(lo: int, hi: int, d: int) -> torch.Tensor:
    """Rows [lo, hi) of the global data set, generated chunk by chunk with fixed seeds."""
    out = torch.empty(hi - lo, d)
    for c0 in range(lo - lo % CHUNK, hi, CHUNK):
        g = torch.Generator().manual_seed(10_000 + c0 // CHUNK)
        block = torch.randn(CHUNK, d, generator=g)
        block[:, : d // 8] += 3.0 * (c0 // CHUNK % 5)  # a few coarse clusters
        a, b = max(lo, c0), min(hi, c0 + CHUNK)
        out[a - lo : b - lo] = block[a - c0 : b - c0]
    return out


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rank_main(rank, world, mode, n, d, reps):
    import rkekernels
    from rkekernels import _collectives as C
    from rkekernels import distributed as D

    sizes = [n // world + (r < n % world) for r in range(world)]
    lo = sum(sizes[:rank])
    x = _rows(lo, lo + sizes[rank], d)
    warm = x[:512].clone()
    score = D.rke_score if mode == "dist" else rkekernels.rke_score
    score(warm, SIGMA)  # warm-up (threads, allocator, gloo connections)
    before = _rss_mib()
    times, cpu, value = [], [], None
    for _ in range(reps):
        if mode == "dist":
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        value = float(score(x, SIGMA))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    res = {
        "times": times,
        "cpu": cpu,
        "value": value,
        "rss_before": before,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "input_mib": x.numel() * 4 / 2**20,
        "comm": dict(C.last_comm) if mode == "dist" else {"gathered_bytes": 0, "reduced_bytes": 0},
    }
    return res


def _run(world, threads, mode, n, d, reps) -> list[dict]:
    return spawn_ranks(
        _rank_main, world, (mode, n, d, reps), init=mode == "dist", threads=threads,
        timeout_s=20 * 60,
    )  # fmt: skip


def tile_shares(n: int, world: int) -> list[float]:
    """Fraction of the n^2 ordered pairs each rank reduces under ``tiles(..., shard=(r, P))``."""
    shares = []
    for r in range(world):
        pairs = 0
        for i0, i1, j0, j1, diag in scores_torch.tiles(n, shard=(r, world)):
            pairs += (i1 - i0) * (j1 - j0) * (1 if diag else 2)
        shares.append(pairs / n**2)
    return shares


def main() -> None:
    ap = parser(__doc__, quick=None)
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all configs")
    args = ap.parse_args()
    n, d, reps = args.n, args.d, args.reps
    configs = [
        ("one process, rkekernels.rke_score", 1, 1, "one"),
        ("one process, rkekernels.rke_score", 1, 2, "one"),
        ("distributed.rke_score, P=1", 1, 1, "dist"),
        ("distributed.rke_score, P=2", 2, 1, "dist"),
    ]
    runs: dict[int, list[list[dict]]] = {i: [] for i in range(len(configs))}
    loads: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    for rnd in range(args.rounds):  # interleaved, so a change of machine load hits every config
        for i, (name, world, threads, mode) in enumerate(configs):
            print(f"round {rnd}: {name}, {threads} thread(s) per rank ...", flush=True)
            loads[i].append(os.getloadavg()[0])
            runs[i].append(_run(world, threads, mode, n, d, reps))
    rows, base_t, base_v = [], None, None
    for i, (name, world, threads, _) in enumerate(configs):
        walls = [max(r["times"][k] for r in res) for res in runs[i] for k in range(reps)]
        wall = statistics.median(walls)
        res = runs[i][-1]
        value = res[0]["value"]
        assert all(r["value"] == value for res_ in runs[i] for r in res_), "ranks disagree"
        if base_t is None:
            base_t, base_v = wall, value
        rows.append(
            {
                "config": name,
                "P": world,
                "threads_per_rank": threads,
                "seconds": wall,
                "min_max_seconds": f"{min(walls):.2f} - {max(walls):.2f}",
                "cpu_seconds_per_rank": " / ".join(
                    f"{statistics.median(c for res_ in runs[i] for c in res_[r]['cpu']):.2f}"
                    for r in range(world)
                ),
                "ratio_vs_baseline": wall / base_t,
                "load_avg_1min": statistics.mean(loads[i]),
                "peak_rss_mib_per_rank": " / ".join(f"{r['peak_rss']:.0f}" for r in res),
                "rss_growth_mib_per_rank": " / ".join(
                    f"{r['peak_rss'] - r['rss_before']:.0f}" for r in res
                ),
                "input_mib_per_rank": " / ".join(f"{r['input_mib']:.1f}" for r in res),
                "all_gather_mib_per_rank": " / ".join(
                    f"{r['comm']['gathered_bytes'] / 2**20:.2f}" for r in res
                ),
                "all_reduce_bytes": res[0]["comm"]["reduced_bytes"],
                "rel_diff_vs_baseline": abs(value - base_v) / abs(base_v),
            }
        )
        print(rows[-1], flush=True)
    shares = tile_shares(n, 2)
    title = (
        f"distributed rke_score, n={n:,}, d={d}, float32, sigma={SIGMA} (median of "
        f"{args.rounds} rounds x {reps} calls; "
        f"ratio < 1 is faster than 1 process x 1 thread). Round-robin tile split at P=2: "
        f"rank shares of the n^2 pairs {shares[0]:.4f} / {shares[1]:.4f}"
    )
    print(write_results("bench_distributed", rows, COLUMNS, title))


if __name__ == "__main__":
    main()
