"""Where the time of `rkekernels.evaluation.evaluate` goes, against one exact `rke_score`.

An embedding file of n samples (d = 768 float32, a 50-cluster mixture) is scored with no
reference and with a reference of n samples, as ``rkekernels evaluate --report`` does (the
report's sweep included). Each output's time is measured by wrapping the functions the
workbench calls:

- ``pass``: the shared exact pass (per-sample sums at sigma and the sweep's 9 bandwidths: RKE,
  its interval, the crowded lists and the sweep's RKE), plus any further pair-sum pass (the
  reference's sweep);
- ``vendi``, ``modes``, ``sweep_vendi`` (9 bandwidths), ``novelty`` (KEN with its null),
  ``relative_rke``; ``other``: the rest (loading, the eigen probe).

Each row gives seconds and the ratio to one exact ``rke_score`` at the default bandwidth timed
in the same run, and the path of each output (``methods``). ``--quick``: n = 1,000.
Writes benchmarks/results/bench_evaluate.{csv,md}.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from .common import RESULTS, parser, run_child, write_results


def _mixture(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)).astype(np.float32) * 3.0
    return centres[rng.integers(0, 50, n)] + rng.normal(size=(n, d)).astype(np.float32)


def _timed(evaluate_args: dict, report: bool = True) -> tuple[dict, dict]:
    """evaluate(**evaluate_args) with the workbench's calls wrapped in timers (``report``: with
    the report's extras, the sweeps, as ``rkekernels evaluate --out``)."""
    from rkekernels.evaluation import workbench

    spent: dict[str, float] = defaultdict(float)
    saved = {}

    def wrap(owner, attr, label):
        fn = getattr(owner, attr)
        saved[(owner, attr)] = fn

        def timed(*a, **k):
            sig = a[2] if len(a) > 2 else k.get("sigma")
            name = label(sig) if callable(label) else label
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0

        setattr(owner, attr, timed)

    wrap(workbench.paths, "shared_sums", "pass")
    wrap(workbench.vendi, "vendi_score", lambda s: "sweep_vendi" if _many(s) else "vendi")
    wrap(workbench.vendi, "vendi_modes", "modes")
    wrap(workbench, "ken_novelty", "novelty")
    wrap(workbench, "relative_rke", "relative_rke")
    try:
        t0 = time.perf_counter()
        keep: dict | None = {} if report else None
        out = workbench.evaluate(**evaluate_args, _keep=keep)
        spent["total"] = time.perf_counter() - t0
    finally:
        for (owner, attr), fn in saved.items():
            setattr(owner, attr, fn)
    parts = sum(v for k, v in spent.items() if k != "total")
    spent["other"] = spent["total"] - parts
    return out, dict(spent)


def _many(sigma) -> bool:
    return isinstance(sigma, list) and len(sigma) == 9


def _write(path: str, n: int, d: int, seed: int) -> None:
    """The mixture written to an .npy file in chunks (the parent stays small)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    step = 20000
    for i0 in range(0, n, step):
        out[i0 : i0 + step] = _mixture(min(step, n - i0), d, seed * 1000 + i0 // step)
    out.flush()
    del out


def measure(gen: str, reference: str | None, null_draws: int = 199) -> dict:
    """One case in this process: one exact rke_score (the baseline), then evaluate with the
    report's extras; the row (seconds, split, paths, peak memory)."""
    import gc

    import rkekernels

    x = torch.from_numpy(np.load(gen))
    t0 = time.perf_counter()
    rkekernels.rke_score(x, rkekernels.default_bandwidth(x))
    one = time.perf_counter() - t0
    del x
    gc.collect()
    args = {"gen": gen, "reference": reference, "cache_dir": None, "null_draws": null_draws}
    out, spent = _timed(args)
    n, d = out["n"], out["d"]
    m = out.get("m", 0)
    cols = ["pass", "vendi", "modes", "sweep_vendi", "relative_rke", "novelty", "other"]
    row = {"case": f"reference m = {m}" if m else "no reference", "n": n, "d": d}
    row.update(rke_score_s=round(one, 2), total_s=round(spent["total"], 2))
    row["ratio"] = round(spent["total"] / one, 2)
    for c in cols:
        row[c + "_s"] = round(spent.get(c, 0.0), 2)
    inputs = sum(os.path.getsize(f) for f in (gen, reference) if f) / 2**20
    row["input_mib"] = round(inputs)
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    row["over_input_mib"] = row["peak_rss_mib"] - row["input_mib"]
    row["methods"] = " ".join(f"{k}={v}" for k, v in out.get("methods", {}).items())
    row["novelty_p"] = out.get("novelty_p")
    row["threads"] = torch.get_num_threads()
    return row


def main(argv: list[str] | None = None) -> None:
    """Run the cases, each in a fresh process (its own peak memory), and write the table."""
    ap = parser(__doc__, "n = 1,000 instead of 5,000")
    ap.add_argument("--large", action="store_true", help="also n = 100,000 (with m = 200,000)")
    args = ap.parse_args(argv)
    n = 1000 if args.quick else 5000
    d = 768
    cases = [(n, 0), (n, 2 * n)]
    if args.large:
        cases += [(100_000, 0), (100_000, 200_000)]
    tmp = tempfile.mkdtemp()
    rows = []
    for n_gen, m in cases:
        gen = os.path.join(tmp, f"gen{n_gen}.npy")
        if not os.path.exists(gen):
            _write(gen, n_gen, d, 0)
        ref = None
        if m:
            ref = os.path.join(tmp, f"ref{m}.npy")
            _write(ref, m, d, 1)
        row = run_child(
            f"import json; from benchmarks.bench_evaluate import measure\n"
            f"print(json.dumps(measure({gen!r}, {ref!r})))"
        )
        if ref:
            os.unlink(ref)
        print(row, file=sys.stderr)
        rows.append(row)
    name = "bench_evaluate_quick" if args.quick else "bench_evaluate"
    cols = list(next(r for r in rows if "error" not in r))
    print(write_results(name, rows, cols, "evaluate: the split of the time (d = 768)"))
    with open(RESULTS / f"{name}.md", "a") as fh:
        fh.write(NOTE)


#: how to read the table (appended to the result page, so docs/performance.md shows it)
NOTE = """
Each case runs in a fresh process (`peak_rss_mib`: that process's peak, the baseline included;
`input_mib`: the embedding files; `over_input_mib` = peak - input). `pass` is the exact pair
passes: GEN's per-sample sums at sigma and the sweep's 9 bandwidths in one pass (RKE, its
interval, the crowded lists, the sweep's RKE), and the reference sweep's pass (on a seeded
subsample when the reference's m^2 / 2 pairs exceed a quarter of GEN's pass). `vendi`, `modes`,
`sweep_vendi` (GEN's and the reference's 9 bandwidths), `novelty` (KEN with its 199-draw null)
are the eigen outputs, each exact while its predicted time is at most max(1.5 x pass, 2 s) or
no slower than random Fourier features, else rff (`rkekernels.evaluation.paths`; KEN's
features shrink until its null fits a quarter of the pass). `relative_rke`: the exact cross
pass; when it goes through random features (`relative_rke=rff`, `paths.cross_rff`) its time is
in `other`. `methods` says which path ran. `ratio` = total / one exact `rke_score` at the
default sigma, timed in the same process just before.
"""


if __name__ == "__main__":
    main()
