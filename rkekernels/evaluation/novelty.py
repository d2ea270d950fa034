"""KEN novelty of a generated set against a reference, and its null (scoring-side novelty).

`ken_novelty`: KEN (Zhang, Jalali, Farnia, ICML 2024), the entropy of the modes of X that the
reference Y lacks, with the samples of each novel mode; with ``null_draws`` also the distribution
of KEN when X is drawn from the reference itself, and a p-value. Gaussian kernel
k_s(a, b) = exp(-||a - b||^2 / (2 s^2)) as everywhere in the library (SPEC 2). KEN's novel modes
use the `rkekernels.vendi.Mode` type of `rkekernels.vendi_modes`.

(Novelty *guidance*, pushing samples away from a reference while sampling, is
`rkekernels.guidance_novelty`.)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from .._input import check_sigma
from ..ops import lapack, scores_torch, spectra
from ..vendi import Mode
from .statistics import _centred, _two_sets

#: ken_novelty(method="auto") solves the dense eigenproblem up to n + m rows, else uses RFF
AUTO_EXACT_MAX = 4096
#: from this many generated rows the rff null draws unions of blocks (`_null_blocks`)
BLOCK_NULL_MIN = 4096
#: blocks per null draw (its n rows in NULL_BLOCKS blocks of n // NULL_BLOCKS)
NULL_BLOCKS = 16
#: the most blocks dealt (the draws' pool: NULL_POOL / NULL_BLOCKS x n reference rows)
NULL_POOL = 64

__all__ = ["AUTO_EXACT_MAX", "BLOCK_NULL_MIN", "NULL_BLOCKS", "NULL_POOL", "Novelty", "ken_novelty"]


class Novelty(NamedTuple):
    """`ken_novelty`: the KEN score and the novel modes of X with respect to Y.

    Attributes:
        score: KEN = -sum_{l > 0} l log(l / L) over the positive eigenvalues l of
            Lambda_X - eta Lambda_Y, L their sum; 0 when X brings nothing new, higher = more novel.
            With ``null_draws > 0``: against a seeded subset of m - n reference rows (the size
            the null's references have).
        novel_mass: L, the total weight of the novel modes.
        eigenvalues: all eigenvalues, descending (numpy float64).
        modes: the top novel modes (positive eigenvalues) as `rkekernels.vendi.Mode`
            (weight = eigenvalue, members = the X samples most in the mode, loadings).
        null_mean, null_std: mean and standard deviation (ddof 1) of KEN over the null draws
            (reference subsets of n rows against the other m - n); None without a null.
        p_value: (1 + #{null KEN >= score}) / (1 + null_draws); None without a null.
    """

    score: float
    novel_mass: float
    eigenvalues: np.ndarray
    modes: list[Mode]
    null_mean: float | None = None
    null_std: float | None = None
    p_value: float | None = None


def _gauss(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """Dense float64 k_s(a_i, b_j) (the eigen-problems below need the matrix anyway)."""
    na, nb = scores_torch.sq_norms(a), scores_torch.sq_norms(b)
    negd = scores_torch.neg_sqdist(a, na, b, nb, False)
    return scores_torch.floored_exp_(negd.mul_(0.5 / (sigma * sigma)))


def _top_modes(vals: torch.Tensor, vecs: torch.Tensor, n: int, top: int, per_mode: int):
    """Modes from eigenpairs (descending) over the first n entries (the X samples).

    Only eigenvalues above round-off (1e-12 of the largest) count. A mode's members are the
    samples with the largest positive entries (the sign of an eigenvector is arbitrary: it is
    chosen so that the X part sums to > 0), loadings their share of the X part's squared norm.
    """
    modes = []
    tol = 1e-12 * max(1.0, float(vals.abs().max())) if vals.numel() else 0.0
    for k in range(min(top, vals.shape[0])):
        if float(vals[k]) <= tol:
            break
        v = vecs[:n, k]
        if float(v.sum()) < 0:
            v = -v
        load = v * v / (v * v).sum().clamp_min(1e-300)
        order = torch.argsort(v, descending=True)[: min(per_mode, n)]
        order = order[v[order] > 0]
        modes.append(Mode(float(vals[k]), order.cpu().numpy(), load[order].cpu().numpy()))
    return modes


def _check_counts(top: Any, per_mode: Any, null_draws: Any) -> None:
    for name, v, low in (("top", top, 1), ("per_mode", per_mode, 1), ("null_draws", null_draws, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")


def ken_novelty(
    x: Any,
    y: Any,
    sigma: Any = None,
    *,
    eta: float = 1.0,
    top: int = 8,
    per_mode: int = 16,
    method: str = "auto",
    dim: int = 4096,
    null_draws: int = 0,
    seed: int = 0,
) -> Novelty:
    """KEN: the entropy of the modes of X that Y (the reference) lacks, with those modes' samples.

    Zhang, Jalali, Farnia, "An Interpretable Evaluation of Entropy-based Novelty of Generative
    Models", ICML 2024. With kernel covariances Lambda_X = (1/n) sum phi(x_i) phi(x_i)^T and
    Lambda_Y alike, the novel modes are the eigenvectors of Lambda_X - eta Lambda_Y with positive
    eigenvalues l > 0, and, with L = sum l::

        KEN = L * H(l / L) = -sum_{l > 0} l log(l / L)

    Its non-zero eigenvalues are those of the (n + m) x (n + m) matrix D G, with
    G = [[Kxx/n, sqrt(eta/(nm)) Kxy], [sqrt(eta/(nm)) Kyx, eta Kyy/m]], D = diag(1_n, -1_m)
    (the paper's fused matrix; a general float64 eigensolver). The X entries of an eigenvector
    are the projections of the samples onto that mode; a mode's samples are the X rows with the
    largest entries. X equal to Y in distribution gives KEN near 0; higher means more novel.

    Methods: "exact" is the dense (n + m)^2 float64 eigenproblem above (O((n + m)^3)); "rff"
    works in ``dim`` random Fourier features phi of the kernel (`rkekernels.ops.spectra`, the
    FKEA route): Lambda_X - eta Lambda_Y = Phi_x^T Phi_x / n - eta Phi_y^T Phi_y / m, a
    symmetric r x r matrix; its eigenvalues approximate KEN's (error about 1/sqrt(dim)) and
    Phi_x w gives the samples' projections on each mode. When n + m < dim the features are first
    replaced by an (n + m)-column factor F of Phi Phi^T = F F^T (same eigenvalues; the n x n
    route: O((n + m)^2 dim + (n + m)^3) instead of O(dim^3), e.g. 45 samples at dim 8,192 take
    well under a second); "auto": exact up to n + m = 4,096, else rff.

    The null (``null_draws`` > 0, a reference of m >= 2n rows): how large is KEN when X comes
    from the reference's own distribution? Each draw takes a random subset of n reference rows
    as "X" and the other m - n as the reference, and computes KEN at the same sigma. So that the
    observed KEN sees an equally large reference, it is computed against the reference rows
    ``torch.randperm(m, generator=torch.Generator().manual_seed(seed))[: m - n]`` (not all m;
    the draws use the following permutations of that generator). Then::

        p = (1 + #{draws with KEN >= observed}) / (1 + null_draws)

    (199 draws put p's floor at 0.005). Calibration caveat: the null is conditional on the
    reference's own sample. On digits pixels (n = 100 fresh digits 0-8, m = 350 of 0-8, 12
    independent repetitions, 19 draws) the observed KEN's z-score against it spread with standard
    deviation 2.5 (from -6 to +3: one fresh set would be flagged), where a pooled permutation
    null (subsets of X and Y together against the rest) gave 1.2; read p as a screen, not an
    exact level. All of it reuses one kernel matrix: the (n + m)^2 Gram
    (exact) or the random features (rff) are factored once, G = F F^T (F: r <= n + m columns,
    eigenvalues below 1e-12 of the largest dropped), and each draw needs only
    eigvalsh(F_A^T F_A (1/n + eta/(m-n)) - eta F_Y^T F_Y / (m - n)), r x r: O(draws (n r^2 + r^3)).
    The draws dominate: one float64 r x r eigvalsh each. 200 digits against a 700-digit
    reference, 199 draws: 11.5 s on one thread of a quiet 2-core machine
    (``python -m benchmarks.bench_novelty``; 121 s when the machine was shared at load ~11).

    Large sets (rff): the covariances are streamed over row blocks in the input's dtype (memory
    O(dim^2) and one block); from n >= BLOCK_NULL_MIN generated rows a null draw is a union of
    NULL_BLOCKS of the M = min(m // b, NULL_POOL) blocks of b = n // NULL_BLOCKS rows of a
    seeded deal of the reference, against all the other reference rows (the blocks'
    covariances are summed once: O(m dim^2) in all and O(dim^3) per draw, instead of
    O(n dim^2) per draw; draws are n - n mod NULL_BLOCKS rows). 199 draws at n = 100,000,
    dim = 1,024 then cost one pass over the reference and 199 eigvalsh of 1,024 rows.

    Args:
        x: (n, d) generated samples. y: (m, d) reference samples (same encoder).
        sigma: one bandwidth; None: the default bandwidth of x (`evaluate` passes the
            reference's).
        eta: the weight of the reference (1 in the paper).
        top: how many novel modes to return. per_mode: samples of X listed per mode.
        method: "auto", "exact" or "rff". dim: the random features (rff).
        null_draws: how many null draws (0: none; needs m >= 2 n).
        seed: the random features' seed (rff) and the null's subsets.

    Returns:
        Novelty(score, novel_mass, eigenvalues, modes, null_mean, null_std, p_value).

    Raises:
        ValueError: bad counts, eta or method; ``null_draws > 0`` with m < 2 n.

    Example:
        >>> import numpy as np
        >>> from rkekernels.evaluation import ken_novelty
        >>> ref = np.array([[0.0], [0.0], [100.0], [100.0]])
        >>> gen = np.array([[0.0], [100.0], [200.0], [200.0]])  # half of it is a new mode
        >>> nov = ken_novelty(gen, ref, sigma=1.0, top=1, per_mode=2)
        >>> round(nov.novel_mass, 3), sorted(nov.modes[0].members.tolist())
        (0.5, [2, 3])
        >>> round(ken_novelty(ref, ref, sigma=1.0).score, 6)
        0.0
        >>> rng = np.random.default_rng(0)
        >>> big = np.concatenate([rng.normal(size=(60, 2)), rng.normal(size=(60, 2)) + 9.0])
        >>> new = rng.normal(size=(20, 2)) + [9.0, -9.0]  # a mode the reference lacks
        >>> ken_novelty(new, big, sigma=1.0, null_draws=19).p_value  # the floor, 1 / 20
        0.05
    """
    _check_counts(top, per_mode, null_draws)
    eta = check_sigma(eta, "eta")  # a finite positive number
    xt, yt, sigmas, many, _ = _two_sets(x, y, sigma)
    if many and len(sigmas) > 1:
        raise ValueError("ken_novelty takes one bandwidth sigma, not a sequence")
    s = sigmas[0]
    n, m = xt.shape[0], yt.shape[0]
    if method not in ("auto", "exact", "rff"):
        raise ValueError(f"method must be 'auto', 'exact' or 'rff'; got {method!r}")
    if null_draws and m < 2 * n:
        raise ValueError(
            f"null_draws={null_draws} needs a reference of at least 2 len(x) = {2 * n} rows "
            f"(subsets of {n} against the other m - {n}); y has {m}: pass a larger reference "
            "or null_draws=0"
        )
    if method == "auto":
        method = "exact" if n + m <= AUTO_EXACT_MAX else "rff"
    if method == "rff":
        _check_dim(dim)
    if method == "rff" and n + m >= dim:  # streamed: no (n + m, d) float64 copy
        xd, yd = xt.detach(), yt.detach()
        c = spectra.mean_rows(xd, yd)
        fx = spectra.rff_map(xd, dim, seed, shift=c, inv_scale=1.0 / s)
        fy = spectra.rff_map(yd, dim, seed, shift=c, inv_scale=1.0 / s)
        return _ken_rff(fx, n, fy, m, dim, eta, top, per_mode, null_draws, seed, xd)
    both = torch.cat([xt, yt]).detach().double()
    (bc,) = _centred(both)
    if null_draws:
        return _ken_null(bc, n, s, method, dim, eta, top, per_mode, null_draws, seed)
    if method == "rff":
        feats = _features(bc, s, method, dim, seed)
        return _ken_features(feats[:n], feats[n:], eta, top, per_mode)
    g = _gauss(bc, bc, s)
    scale = torch.cat(
        [torch.full((n,), 1.0 / math.sqrt(n)), torch.full((m,), math.sqrt(eta / m))]
    ).to(g)
    d = torch.cat([torch.ones(n), -torch.ones(m)]).to(g)
    fused = (d * scale)[:, None] * g * scale[None, :]  # D G
    cvals, cvecs = lapack.eig(fused)
    # real spectrum (similar to a symmetric matrix); an eigenvector's phase is arbitrary: rotate
    # each so that its largest entry is real, then keep the real part
    big = cvecs.gather(0, cvecs.abs().argmax(0, keepdim=True))
    cvecs = cvecs * (big.conj() / big.abs())
    order = torch.argsort(cvals.real, descending=True)
    vals, vecs = cvals.real[order], cvecs.real[:, order]
    return _novelty(vals, vecs, n, top, per_mode)


def _ken_of(vals: torch.Tensor) -> tuple[float, float]:
    """(KEN, L) from eigenvalues: the positive ones above round-off (1e-12 of the largest)."""
    pos = vals[vals > 1e-12 * max(1.0, float(vals.abs().max()))]
    mass = float(pos.sum()) if pos.numel() else 0.0
    # each term -l log(l / L) >= 0 (l <= L): max() only turns -0.0 into 0.0
    score = max(0.0, float(-(pos * torch.log(pos / mass)).sum())) if pos.numel() else 0.0
    return score, mass


def _novelty(vals: torch.Tensor, vecs: torch.Tensor, n: int, top: int, per_mode: int) -> Novelty:
    """KEN from the eigenpairs (descending), the X rows of ``vecs`` first."""
    score, mass = _ken_of(vals)
    return Novelty(score, mass, vals.cpu().numpy(), _top_modes(vals, vecs, n, top, per_mode))


def _factor(g: torch.Tensor) -> torch.Tensor:
    """F (k, r), F F^T = g (symmetric PSD, k x k); eigenvalues below 1e-12 of the top dropped."""
    vals, vecs = lapack.eigh(g)
    keep = vals > 1e-12 * max(float(vals[-1]), 0.0)
    return vecs[:, keep] * vals[keep].sqrt()


def _check_dim(dim: Any) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (random features); got {dim!r}")


def _ken_rff(fx, n, fy, m, dim, eta, top, per_mode, draws, seed, like) -> Novelty:
    """KEN through random features, streamed (no copy of x or y, no (n + m, dim) matrix).

    C_x = sum phi(x_i) phi(x_i)^T over X's row blocks; one pass over the reference's row
    blocks sums the covariance of the rows KEN is taken against (all m; with a null the seeded
    m - n, as `_ken_null`) and, for the null from n >= BLOCK_NULL_MIN, the total and the
    blocks of `_null_blocks`. KEN: eigh of C_x / n - eta C_ref / m_ref; the X rows'
    projections on the top modes in a second pass over X. Memory: O(dim^2) (M dim^2 for the
    blocks) and one block of features.
    """
    gen = torch.Generator().manual_seed(int(seed))
    # features on x's device (``like``), in its dtype; the dim x dim algebra runs on the CPU
    cx = spectra.covariance(fx, n, dim, like.device, like.dtype).cpu()
    keep, owner, nb = None, None, 0
    if draws:
        keep = torch.zeros(m, dtype=torch.bool)
        keep[torch.randperm(m, generator=gen)[: m - n]] = True
        if n >= BLOCK_NULL_MIN:
            owner, nb = _deal(m, n, gen)
    total, c_ref, covs = _reference_pass(fy, m, dim, keep, owner, nb)
    m_ref = m - n if draws else m
    vals, w = lapack.eigh(cx.div_(n).sub_(c_ref if draws else total, alpha=eta / m_ref))
    vals, w = vals.flip(0), w.flip(1)[:, : max(1, top)]
    proj = [fx(i0, i1).double().cpu() @ w for i0, i1 in spectra.row_blocks(n, dim)]
    obs = _novelty(vals, torch.cat(proj), n, top, per_mode)
    if not draws:
        return obs
    if owner is not None:
        return _null_blocks(obs, total, covs, n, m, eta, draws, gen)
    return _null_draws(obs, fy(0, m).cpu(), n, eta, draws, gen)


def _deal(m: int, n: int, gen) -> tuple[torch.Tensor, int]:
    """The null's blocks: owner[i] in [0, M) for M = min(m // b, NULL_POOL) blocks of
    b = n // NULL_BLOCKS rows dealt at random (``gen``), -1 for the rows left out."""
    b = n // NULL_BLOCKS
    nb = min(m // b, NULL_POOL)
    owner = torch.full((m,), -1, dtype=torch.long)
    owner[torch.randperm(m, generator=gen)[: nb * b]] = torch.arange(nb).repeat_interleave(b)
    return owner, nb


def _reference_pass(fy, m, dim, keep, owner, nb):
    """One pass over the reference's feature blocks: T = sum over all rows (float64), the sum
    over the rows ``keep`` (or None), and per block g of ``owner`` its sum (float32 (nb, dim,
    dim), or None)."""
    total = torch.zeros(dim, dim, dtype=torch.float64)
    c_ref = torch.zeros(dim, dim, dtype=torch.float64) if keep is not None else None
    covs = torch.zeros(nb, dim, dim) if owner is not None else None
    for i0, i1 in spectra.row_blocks(m, dim):
        f = fy(i0, i1).cpu()
        total += (f.T @ f).double()
        if keep is not None:
            fk = f[keep[i0:i1]]
            c_ref += (fk.T @ fk).double()
        if owner is not None:
            own = owner[i0:i1]
            for g in own[own >= 0].unique().tolist():
                fg = f[own == g]
                covs[g] += (fg.T @ fg).float()
    return total, c_ref, covs


def _null_blocks(obs: Novelty, total, covs, n: int, m: int, eta, draws, gen) -> Novelty:
    """The null for large n from block covariances (`ken_novelty`, "Large sets").

    ``covs``: C_g = sum_{i in g} phi_i phi_i^T of the M blocks of b = n // NULL_BLOCKS rows
    (`_deal`), ``total`` = T over all m reference rows. A draw takes NULL_BLOCKS of the M blocks
    as "X" (n' = NULL_BLOCKS b rows, S their summed C_g) against the other m - n' rows:
    eigvalsh of S / n' - eta (T - S) / (m - n'); O(dim^3) per draw instead of O(n dim^2).
    """
    nb = covs.shape[0]
    n2 = NULL_BLOCKS * (n // NULL_BLOCKS)
    k2 = m - n2
    null = []
    for _ in range(draws):
        sel = covs[torch.randperm(nb, generator=gen)[:NULL_BLOCKS]].sum(0, dtype=torch.float64)
        mat = sel.mul_(1.0 / n2 + eta / k2).sub_(total, alpha=eta / k2)
        null.append(_ken_of(lapack.eigvalsh(mat))[0])
    return _with_null(obs, np.asarray(null), draws)


def _features(bc: torch.Tensor, sigma: float, method: str, dim: int, seed: int) -> torch.Tensor:
    """Features F ((n + m), r) of the kernel with F F^T = the Gram matrix (exact) or Phi Phi^T
    of ``dim`` random Fourier features (rff); r <= n + m (the n x n route when n + m < dim)."""
    if method == "exact":
        return _factor(_gauss(bc, bc, sigma))
    _check_dim(dim)
    phi = spectra.rff_map(bc / sigma, dim, int(seed))(0, bc.shape[0]).double()
    if phi.shape[1] > phi.shape[0]:  # fewer rows than features: factor the rows' Gram
        return _factor(phi @ phi.T)
    return phi


def _ken_features(fx, fy, eta, top, per_mode) -> Novelty:
    """KEN in features: eigh of F_x^T F_x / n - eta F_y^T F_y / m; modes from F_x w."""
    n, m = fx.shape[0], fy.shape[0]
    vals, w = lapack.eigh(fx.T @ fx / n - eta * (fy.T @ fy) / m)
    vals, w = vals.flip(0), w.flip(1)
    return _novelty(vals, fx @ w, n, top, per_mode)


def _ken_null(bc, n, sigma, method, dim, eta, top, per_mode, draws, seed) -> Novelty:
    """The observed KEN against m - n reference rows, and KEN of ``draws`` reference splits.

    The null's features come from the reference alone, rotated so that F_Y^T F_Y = diag(lam):
    each draw is then one (n, r) x (r, n) product and one r x r eigvalsh (r <= m).
    """
    m = bc.shape[0] - n
    k = m - n
    gen = torch.Generator().manual_seed(int(seed))
    sub = torch.randperm(m, generator=gen)[:k].to(bc.device)
    rows = torch.cat([torch.arange(n, device=bc.device), n + sub])
    f = _features(bc[rows], sigma, method, dim, seed)
    obs = _ken_features(f[:n], f[n:], eta, top, per_mode)
    return _null_draws(obs, _features(bc[n:], sigma, method, dim, seed), n, eta, draws, gen)


def _null_draws(obs: Novelty, fy: torch.Tensor, n: int, eta: float, draws: int, gen) -> Novelty:
    """``obs`` with the null: KEN of ``draws`` splits of the reference's features ``fy`` (m, r)
    into n rows against the other m - n (the subsets drawn from ``gen``), and the p-value.

    fy is first rotated so that F_Y^T F_Y = diag(lam) (float64), each draw is then one
    (r, n) x (n, r) product in fy's dtype and one r x r float64 eigvalsh.
    """
    m = fy.shape[0]
    k = m - n
    lam, u = lapack.eigh(fy.T.double() @ fy.double())
    fy = fy @ u.to(fy.dtype)  # now fy^T fy = diag(lam)
    null = []
    for _ in range(draws):
        a = fy[torch.randperm(m, generator=gen)[:n].to(fy.device)]
        # F_A^T F_A / n - eta (F_Y^T F_Y - F_A^T F_A) / k
        mat = (a.T @ a).double().mul_(1.0 / n + eta / k)
        mat.diagonal().sub_(lam * (eta / k))
        null.append(_ken_of(lapack.eigvalsh(mat))[0])
    return _with_null(obs, np.asarray(null), draws)


def _with_null(obs: Novelty, vals: np.ndarray, draws: int) -> Novelty:
    """``obs`` with the null's mean, standard deviation (ddof 1) and p-value."""
    p = (1 + int((vals >= obs.score).sum())) / (1 + draws)
    std = float(vals.std(ddof=1)) if draws > 1 else 0.0
    return obs._replace(null_mean=float(vals.mean()), null_std=std, p_value=p)
