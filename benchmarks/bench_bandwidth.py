"""Which default bandwidth separates structure at a SHARED sigma? Candidate rules (issue 22).

The question a user asks is comparative: is this set more diverse than that one? Scores compare
only at one shared bandwidth (at each set's own scale-adaptive default, every set is measured
against its own spread and all score alike). So each rule gets ONE sigma from a diverse set, and
that sigma scores the diverse set and each 1-class set of the same size n:

- contrast = RKE(all classes) / median over the classes of RKE(one class), n rows each (the
  whole set subsampled to n; n = 170 for digits pixels, 70 for digits features, the smallest
  class for wine, iris and breast_cancer, 200 for the mixtures);
- "% best" = (contrast - 1) / (best contrast - 1), the best over 120 bandwidths from 1/20 to 4x
  the median distance of the diverse set (negative: the set scores below one class);
- "9 vs 2": sigma from a 10-class reference of 700 digits, then RKE of a 9-class set of 200 over
  RKE of a 2-class set of 200, both drawn from the other 1,097 digits (median over 10 draws:
  9 classes without digit k, 2 classes {k, k + 1 mod 10});
- noise rows (one Gaussian or uniform blob): RKE / n at each rule's sigma (near 1: the score
  counts points) and whether `default_bandwidth` warns that the distances concentrate.

Data: scikit-learn's bundled digits as raw pixels (0-16) and as the 32-d penultimate features
of a small MLP classifier trained here (64-128-32-10, ReLU, Adam, 200 full-batch steps, seed 0,
a few seconds on a CPU); wine, iris, breast_cancer standardised; Gaussian mixtures (centres
10 N(0, I), unit clusters). The rules (each from the diverse set alone):

- median: the median pairwise distance (`median_bandwidth`);
- plateau: the previous default, the flattest stretch of RKE(sigma) with 1.5 <= RKE <= m / 4;
- med/2, med/2.5, med/3: a fraction of the median distance (med/2.5 is `default_bandwidth`);
- knn5, knn10, knn m/10: the median distance to the k-th nearest distinct neighbour;
- rke=sqrt(m): where RKE(sigma) of the set falls to sqrt(m);
- steepest: where log RKE falls fastest against log sigma.

The last two rows keep the prompt-bandwidth check: RKE(T) of 10 prompts at each rule's sigma_t
(10 = the prompts are told apart). Run: ``python -m benchmarks.bench_bandwidth`` (about 20 s on
2 cores; ``--quick``, a few seconds: no breast_cancer, features, 9 vs 2 or extra mixtures,
written to bench_bandwidth_quick); writes benchmarks/results/bench_bandwidth.{csv,md}.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Report, parser

import rkekernels as rk

RULES = [
    "median",
    "plateau",
    "med/2",
    "med/2.5 (default)",
    "med/3",
    "knn5",
    "knn10",
    "knn m/10",
    "rke=sqrt(m)",
    "steepest",
]


def sq_dists(x: np.ndarray) -> torch.Tensor:
    """(n, n) float64 squared distances."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    xt = xt - xt.mean(0)
    nrm = (xt * xt).sum(1)
    d2 = (nrm[:, None] + nrm[None, :] - 2.0 * xt @ xt.T).clamp_(min=0.0)
    return d2.fill_diagonal_(0.0)


def rke(d2: torch.Tensor, s: float) -> float:
    """RKE = n^2 / sum_ij exp(-||a - b||^2 / s^2) (the squared Gaussian kernel of the SPEC)."""
    return float(d2.shape[0] ** 2 / torch.exp(-d2 / (s * s)).sum())


def _median(d2: torch.Tensor) -> float:
    m = d2.shape[0]
    iu = torch.triu_indices(m, m, 1)
    return float(d2[iu[0], iu[1]].sqrt().median())


def _curve(d2: torch.Tensor, lo: float, hi: float, num: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.geomspace(lo, hi, num)
    return grid, np.array([rke(d2, s) for s in grid])


def _knn_dists(d2: torch.Tensor) -> torch.Tensor:
    off = d2.clone().fill_diagonal_(math.inf)
    off[off <= 0] = math.inf  # duplicates are not neighbours
    return off.sort(1).values.sqrt()


_CONTEXT: dict[int, tuple] = {}


def _context(d2: torch.Tensor, med: float) -> tuple:
    """(k-NN distances, median NN distance, RKE on 200 sigmas) of one set, computed once."""
    if id(d2) not in _CONTEXT:
        _CONTEXT.clear()  # one set at a time
        knn = _knn_dists(d2)
        nn = float(knn[:, 0][torch.isfinite(knn[:, 0])].median())
        _CONTEXT[id(d2)] = (knn, nn, _curve(d2, nn / 4.0, 2.0 * med, 200))
    return _CONTEXT[id(d2)]


def rule(name: str, x: np.ndarray, d2: torch.Tensor) -> float:
    m, med = d2.shape[0], _median(d2)
    if name == "median":
        return rk.median_bandwidth(x)
    if name == "med/2.5 (default)":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rk.default_bandwidth(x)
    if name.startswith("med/"):
        return med / float(name[4:])
    knn, nn, (grid, r) = _context(d2, med)
    if name.startswith("knn"):
        k = max(1, m // 10) if name == "knn m/10" else int(name[3:])
        col = knn[:, k - 1]
        col = col[torch.isfinite(col)]
        return float(col.median()) if col.numel() else 0.0
    if name == "plateau":  # the previous default, reimplemented here for the comparison
        grid, r = _curve(d2, nn / 4.0, 2.0 * med, 25)
        lr = np.log(r)
        slope = np.abs(np.diff(lr)) / np.diff(np.log(grid))
        mid = np.sqrt(r[1:] * r[:-1])
        ok = (mid >= 1.5) & (mid <= 0.25 * m)
        if not ok.any():
            return med
        i = int(np.argmin(np.where(ok, slope, np.inf)))
        return float(math.sqrt(grid[i] * grid[i + 1]))
    if name == "rke=sqrt(m)":
        return float(grid[int(np.argmax(r <= math.sqrt(m)))])
    assert name == "steepest", name
    slope = np.diff(np.log(r)) / np.diff(np.log(grid))
    i = int(np.argmin(slope))
    return float(math.sqrt(grid[i] * grid[i + 1]))


def mlp_features(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The 32-d penultimate features (after ReLU) of a small digit classifier, seeded."""
    torch.manual_seed(0)
    xt = torch.tensor(x / 16.0, dtype=torch.float32)
    yt = torch.tensor(y)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
        print(f"MLP training accuracy {acc:.3f}", flush=True)
        return net[:4](xt).double().numpy()


def _std(x: np.ndarray) -> np.ndarray:
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def _mixture(k: int, d: int, per: int = 200, sep: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = sep * rng.normal(size=(k, d))
    x = np.concatenate([c + rng.normal(size=(per, d)) for c in centres])
    return x, np.repeat(np.arange(k), per)


def class_sets(quick: bool, digits, feats):
    """(name, x, labels, n) for the contrast rows."""
    from sklearn import datasets

    x, y = digits
    yield "digits pixels", x, y, 170
    if feats is not None:
        yield "digits MLP features (32-d)", feats, y, 70
    loaders = [("wine", datasets.load_wine), ("iris", datasets.load_iris)]
    if not quick:
        loaders.append(("breast_cancer", datasets.load_breast_cancer))
    for name, load in loaders:
        b = load()
        yield f"{name} (standardised)", _std(b.data.astype(np.float64)), b.target, None
    yield "mixture 10, d = 64", *_mixture(10, 64), 200
    if not quick:
        yield "mixture 10, d = 16", *_mixture(10, 16), 200
        yield "mixture 5, d = 4", *_mixture(5, 4), 200
        yield "mixture 4, d = 2", *_mixture(4, 2), 200


def _cell(ratio: float, best: float) -> str:
    return f"{ratio:.2f}x ({100.0 * (ratio - 1.0) / (best - 1.0):.0f}%)"


def _default_warns(x: np.ndarray) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rk.default_bandwidth(x)
    return any("rke_sweep" in str(w.message) for w in caught)


def contrast_row(name, x, y, n, rng) -> dict:
    classes = np.unique(y)
    n = n or int(min((y == c).sum() for c in classes))
    whole = x[rng.choice(len(x), n, replace=False)]
    d_all = sq_dists(whole)
    d_one = [sq_dists(x[y == c][rng.choice((y == c).sum(), n, replace=False)]) for c in classes]

    def ratio(s: float) -> float:
        return rke(d_all, s) / float(np.median([rke(d, s) for d in d_one]))

    med = _median(d_all)
    grid = np.geomspace(med / 20.0, 4.0 * med, 120)
    ratios = [ratio(s) for s in grid]
    best = max(ratios)
    row = {"data set": name, "n": n, "classes": len(classes)}
    row["best contrast (sigma / median)"] = f"{best:.2f}x (1/{med / grid[np.argmax(ratios)]:.2f})"
    for r in RULES:
        row[r] = _cell(ratio(rule(r, whole, d_all)), best)
    row["warns"] = "yes" if _default_warns(whole) else "no"
    return row


def nine_vs_two_row(name: str, x: np.ndarray, y: np.ndarray) -> dict:
    perm = np.random.default_rng(0).permutation(len(x))
    ref, rest = x[perm[:700]], perm[700:]
    d_ref = sq_dists(ref)
    sig = {r: rule(r, ref, d_ref) for r in RULES}
    med = _median(d_ref)
    grid = np.geomspace(med / 20.0, 4.0 * med, 120)
    ratios = {r: [] for r in RULES}
    curves = []
    for k in range(10):
        rng = np.random.default_rng(k)
        nine = rest[y[rest] != k]
        two = rest[np.isin(y[rest], [k, (k + 1) % 10])]
        d9 = sq_dists(x[rng.choice(nine, 200, replace=False)])
        d2 = sq_dists(x[rng.choice(two, min(200, len(two)), replace=False)])
        for r in RULES:
            ratios[r].append(rke(d9, sig[r]) / rke(d2, sig[r]))
        curves.append([rke(d9, s) / rke(d2, s) for s in grid])
    med_curve = np.median(np.array(curves), 0)
    best = float(med_curve.max())
    row = {"data set": f"{name}: 9 vs 2 classes at a reference's sigma", "n": 200, "classes": "9/2"}
    row["best contrast (sigma / median)"] = (
        f"{best:.2f}x (1/{med / grid[int(np.argmax(med_curve))]:.2f})"
    )
    for r in RULES:
        row[r] = _cell(float(np.median(ratios[r])), best)
    return row


def noise_rows(quick: bool):
    rng = np.random.default_rng(5)
    n = 200 if quick else 500
    for name, x in [
        ("noise: Gaussian, d = 2", rng.normal(size=(n, 2))),
        ("noise: Gaussian, d = 16", rng.normal(size=(n, 16))),
        ("noise: Gaussian, d = 64", rng.normal(size=(n, 64))),
        ("noise: Gaussian, d = 512", rng.normal(size=(n, 512))),
        ("noise: uniform cube, d = 64", rng.uniform(size=(n, 64))),
    ]:
        d2 = sq_dists(x)
        row = {"data set": name, "n": len(x), "classes": 1, "best contrast (sigma / median)": "-"}
        for r in RULES:
            row[r] = f"RKE/n {rke(d2, rule(r, x, d2)) / len(x):.2f}"
        row["warns"] = "yes" if _default_warns(x) else "no"
        yield row


def prompt_rows():
    labels = np.repeat(np.arange(10), 20)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    for name, t in [
        ("sigma_t: one-hot labels, 10 classes", np.eye(10)[labels]),
        (
            "sigma_t: embedding prompts, 10 x 20 paraphrases",
            base[labels] + 0.05 * rng.normal(size=(200, 32)),
        ),
    ]:
        d2 = sq_dists(t)
        row = {"data set": name, "n": len(t), "classes": 10, "best contrast (sigma / median)": "-"}
        for r in RULES:
            s = rule(r, t, d2)
            row[r] = f"RKE(T) {rke(d2, s):.2f}" if s > 0 else "sigma = 0"
        yield row


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "no breast_cancer, features, 9 vs 2 or extra mixtures").parse_args(argv)
    torch.set_num_threads(1)
    from sklearn import datasets

    b = datasets.load_digits()
    digits = (b.data.astype(np.float64), b.target)
    feats = None if args.quick else mlp_features(*digits)
    cols = ["data set", "n", "classes", "best contrast (sigma / median)", *RULES, "warns"]
    rep = Report(
        RESULTS,
        "bench_bandwidth_quick" if args.quick else "bench_bandwidth",
        "Bandwidth rules at a shared sigma: contrast (RKE all / RKE one class) and % of the "
        "best contrast any sigma gives",
        cols,
        notes=[
            "cells: contrast at the rule's sigma of the diverse set (noise rows: RKE / n at the "
            "rule's sigma; prompt rows: RKE(T) at the rule's sigma_t)",
            "% = (contrast - 1) / (best - 1); best over 120 sigmas in [median/20, 4 median]",
            "warns: `default_bandwidth` of the diverse set warns that its distances concentrate",
        ],
    )
    for name, x, y, n in class_sets(args.quick, digits, feats):
        rep.add(**contrast_row(name, x, y, n, np.random.default_rng(1)))
        print(rep.rows[-1], flush=True)
    if not args.quick:
        for name, x in [("digits pixels", digits[0]), ("digits MLP features", feats)]:
            rep.add(**nine_vs_two_row(name, x, digits[1]))
            print(rep.rows[-1], flush=True)
    for row in [*noise_rows(args.quick), *prompt_rows()]:
        rep.add(**row)
    print(rep.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
