"""Which default bandwidth lets RKE see structure? A study at equal n (issue 12).

For each data set (synthetic Gaussian mixtures; scikit-learn's bundled iris, wine,
breast_cancer and digits, z-scored) the whole set is subsampled to the size n of its smallest
class, and each class is cut to n, so that every score counts the same number of points. Each
set is scored at ITS OWN bandwidth from each candidate rule:

- median: the median pairwise distance (`median_bandwidth`, the old default);
- knn1, knn5, knn10: the median distance to the k-th nearest neighbour (a local scale);
- steepest: where log RKE falls fastest against log sigma;
- plateau: `default_bandwidth`, the flattest stretch with 1.5 <= RKE <= n/4 (the choice).

Columns: RKE of the whole set ("all"), the mean RKE of one class ("one"), and all / one. A rule
that sees structure scores k well-separated clusters about k times one cluster. The prompt
bandwidth sigma_t is studied the same way on one-hot labels and on embedding prompts (10
prompts, unit vectors in 32 dimensions, 20 paraphrases each with noise 0.05): the column is
RKE(T) at each rule's sigma_t (10 = the prompts are told apart).

Run: ``python -m benchmarks.bench_bandwidth`` (about a minute; ``--quick``: fewer real sets, or
``rkekernels bench --only bandwidth``); writes
benchmarks/results/bench_bandwidth.{csv,md}.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results

import rkekernels as rk

RULES = ["median", "knn1", "knn5", "knn10", "steepest", "plateau"]


def _dists(x: np.ndarray) -> torch.Tensor:
    xt = torch.as_tensor(x, dtype=torch.float64)
    return torch.cdist(xt, xt)


def _knn(x: np.ndarray, k: int) -> float:
    d = _dists(x)
    d.fill_diagonal_(math.inf)
    return float(d.sort(1).values[:, k - 1].median())


def _steepest(x: np.ndarray) -> float:
    grid = rk.compare.sweep_grid(x, 33)
    r = np.log(rk.rke_sweep(x, grid).rke)
    i = int(np.argmin(np.diff(r) / np.diff(np.log(grid))))
    return float(math.sqrt(grid[i] * grid[i + 1]))


def rule(name: str, x: np.ndarray) -> float:
    if name == "median":
        return rk.median_bandwidth(x)
    if name.startswith("knn"):
        return _knn(x, int(name[3:]))
    if name == "steepest":
        return _steepest(x)
    return rk.default_bandwidth(x)


def _mixture(k: int, d: int, per: int, sep: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = sep * rng.normal(size=(k, d))
    x = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    return x, np.repeat(np.arange(k), per)


def data_sets(quick: bool):
    yield "mixture 10 x N(0, I), d = 64, centres 10 N(0, I)", *_mixture(10, 64, 200, 10.0)
    yield "mixture 10, d = 16", *_mixture(10, 16, 200, 10.0)
    yield "mixture 5, d = 4", *_mixture(5, 4, 200, 10.0)
    yield "mixture 4, d = 2", *_mixture(4, 2, 200, 10.0)
    yield "mixture 10, d = 2 (centres overlap)", *_mixture(10, 2, 200, 10.0)
    from sklearn import datasets

    loaders = [
        ("iris", datasets.load_iris),
        ("wine", datasets.load_wine),
        ("breast_cancer", datasets.load_breast_cancer),
        ("digits", datasets.load_digits),
    ]
    for name, load in loaders[:2] if quick else loaders:
        b = load()
        x = b.data.astype(np.float64)
        sd = x.std(0)
        x = (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
        yield f"{name} (z-scored; classes overlap)", x, b.target


def prompt_sets():
    labels = np.repeat(np.arange(10), 20)
    yield "one-hot labels, 10 classes", np.eye(10)[labels]
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    yield "embedding prompts, 10 x 20 paraphrases", base[labels] + 0.05 * rng.normal(size=(200, 32))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    torch.set_num_threads(1)
    rows = []
    for name, x, y in data_sets(quick):
        classes = np.unique(y)
        n = int(min((y == c).sum() for c in classes))
        whole = x[np.random.default_rng(1).choice(len(x), n, replace=False)]
        row = {"data set": name, "n": n, "classes": len(classes)}
        for r in RULES:
            all_ = float(rk.rke_score(whole, rule(r, whole)))
            one = float(
                np.mean([rk.rke_score(x[y == c][:n], rule(r, x[y == c][:n])) for c in classes])
            )
            row[r] = f"{all_:.2f} / {one:.2f} = {all_ / one:.2f}x"
        rows.append(row)
        print(row, flush=True)
    for name, t in prompt_sets():
        row = {"data set": f"sigma_t: {name}", "n": len(t), "classes": 10}
        for r in RULES:
            s = rule(r, t)  # kNN distances of repeated prompts are 0: no bandwidth
            row[r] = f"RKE(T) {float(rk.rke_score(t, s)):.2f}" if s > 0 else "sigma = 0"
        rows.append(row)
        print(row, flush=True)
    md = write_results(
        "bench_bandwidth",
        rows,
        ["data set", "n", "classes", *RULES],
        "Default bandwidths at equal n: RKE(all) / RKE(one class) at each set's own sigma",
    )
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
