"""KEN novelty against its null on real data: is a set novel, or is its KEN sampling noise?

Data: scikit-learn's bundled digits as raw pixels (64-d, 0-16), rows in a fixed random order
(seed 0). Reference: 700 digits of classes 0-8. Sets of 200 rows disjoint from the reference:

- "same classes": the next 200 digits of classes 0-8 (the reference's own distribution: a
  p-value of 0.05 or more is the target, "not novel");
- "digit 9": the 180 nines of the data set (it has no more), a class the reference lacks
  (target: p <= 0.01, "novel").

sigma is the reference's `default_bandwidth` (as ``rkekernels evaluate --reference`` uses);
`ken_novelty(..., null_draws=199, seed=0)`: KEN of 199 reference subsets of 200 against the other
500, and the observed KEN against a seeded 500-row subset. The table gives KEN, the null's mean
and standard deviation, p, and the wall time of the whole call (the torch thread count is
recorded: one thread by default, as the draws are small eigenproblems).

Run: ``python -m benchmarks.bench_novelty`` (``--quick``: 49 draws); writes
benchmarks/results/bench_novelty.{csv,md}.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from .common import parser, write_results


def main(argv: list[str] | None = None) -> None:
    """Run the study and write its table."""
    args = parser(__doc__, "49 draws instead of 199").parse_args(argv)
    from sklearn.datasets import load_digits

    import rkekernels
    from rkekernels.evaluation import ken_novelty

    torch.set_num_threads(1)
    draws = 49 if args.quick else 199
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    base = order[y[order] < 9]
    ref = x[base[:700]]
    sets = {"same classes (0-8)": x[base[700:900]], "digit 9": x[order[y[order] == 9][:200]]}
    sigma = rkekernels.default_bandwidth(ref)
    rows = []
    for name, g in sets.items():
        t0 = time.perf_counter()
        nov = ken_novelty(g, ref, sigma, null_draws=draws, seed=0)
        rows.append(
            {
                "set": name,
                "n": len(g),
                "m": len(ref),
                "sigma": round(sigma, 3),
                "ken": round(nov.score, 4),
                "null_mean": round(nov.null_mean, 4),
                "null_std": round(nov.null_std, 4),
                "draws": draws,
                "p": round(nov.p_value, 4),
                "seconds": round(time.perf_counter() - t0, 1),
                "threads": torch.get_num_threads(),
            }
        )
        print(rows[-1], file=sys.stderr)
    cols = list(rows[0])
    name = "bench_novelty_quick" if args.quick else "bench_novelty"
    print(write_results(name, rows, cols, "KEN novelty against its null (digits pixels)"))


if __name__ == "__main__":
    main()
