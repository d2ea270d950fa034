"""Which diversity guidance, at what setting: a quality-diversity frontier on learned models.

Run:  python -m benchmarks.bench_frontier [--quick]

Models, learned here from scikit-learn's bundled digits (1,797 x 64, pixels 0..16 mapped to
[-1, 1]) and cached under ``~/.cache/rkekernels/bench_frontier/`` (``$RKEKERNELS_CACHE``), keyed
by a hash of their configuration: denoisers in the k-diffusion convention ``D(x, sigma[, cond])
-> x0 estimate``, MLPs with Fourier features of log sigma and the EDM preconditioning (Karras et
al. 2022), trained with the EDM loss for a fixed number of steps (about a minute each on 2 cores):

- ``uncond``: a skewed unconditional model, trained on all digits of three dominant classes and
  8% of each other class (about 85% of its data is three classes);
- ``cond``: a class-conditional model (a learned class embedding is its condition);
- ``uncond-B``, ``cond-B``: held-out models for the defaults (another seed, width and depth; the
  unconditional one with three other dominant classes). The defaults of `DiversityGuidance` were
  chosen on ``uncond`` / ``cond`` and are measured as they stand on these two: ``uncond-B`` over
  the full sweep, ``cond-B`` with unguided, the defaults and each peer near its knee
  (`heldout_methods`).

Sampling: 30 Karras steps (sigma 10 -> 0.01, rho 7), Euler (`rkekernels.toy.sample_euler`).
SPARKE and Vendi guidance go through `rkekernels.adapters.kdiffusion.guided_denoiser`, the
peers through their wrappers in `benchmarks.guidance_peers` (Particle Guidance, CADS), written
from their papers. Every method samples the same number of samples in the same batches:

- unconditional: 16 batches of 8 (128 samples); SPARKE/Vendi commit each batch to a bank that
  starts empty, so **their bank spans batches** while Particle Guidance sees one batch at a
  time (its design);
- class-conditional: 10 classes x 4 rounds, each a batch of 4 of one class, interleaved
  (class 0..9, then again; 160 samples); SPARKE's bank holds every class and its prompt kernel
  (the class embedding as cond) keeps the others out; CADS corrupts the class embedding.

Measures (all against the real digits; one shared bandwidth for the scores, the median
10-NN distance of the real data):

- ``eff_classes``: exp of the entropy of the predicted-class histogram (classifier: an MLP
  trained here on the first 1,500 digits for 600 steps: 92% accuracy on the other 297, other
  writers; a limit of these numbers);
- ``rke`` / ``vendi``: RKE and order-1 Vendi of all samples; ``rke_within`` /
  ``vendi_within``: the mean over classes (the requested class when conditional, the predicted
  one otherwise, classes with >= 2 samples) of the score of that class's samples;
- ``precision`` / ``recall``: k-NN precision and recall, k = 3 (Kynkaenniemi et al. 2019),
  against all real digits (recall: the conditional runs, per class against the real digits of
  that class, averaged);
- ``consistency``: the fraction classified as the requested class (conditional);
- ``step_ms``, ``cost``: the wall time of one sampler step (the denoiser call plus the method),
  and its ratio to the plain denoiser's step, averaged over whole runs (noisy on a shared
  machine); the rows with setting "timing" are the interleaved probe `timing` (run last, or
  alone with ``--timing``, which writes bench_frontier_timing.* unless ``--append``);
- ``moved_match``, ``moved_unrelated`` (the conditional defaults): `prompt_leak`.

Each setting is run with 3 seeds (0, 1, 2: noise, CADS noise); the CSV holds the mean (and for
the main measures the population standard deviation over the seeds). The novelty term of
`DiversityGuidance` is not swept: `guided_denoiser` does not apply it. About 40 minutes on 2
shared cores (Vendi guidance dominates: it re-decomposes its covariance at every step). The
frontier plots show diversity against precision. ``--quick``: the two tuning models trained for
fewer steps, a reduced sweep and one seed; writes bench_frontier_quick.{csv,md,png} (never over
the committed full results).

``--beyond`` (issue 24 item 3): the SPARKE variants of `benchmarks.guidance_beyond` (the
gradient through the denoiser's Jacobian, on the noisy latent, schedule shapes, a trust-region
cap) with unguided, SPARKE's scale sweep and Particle Guidance rerun beside them
(`beyond_methods`; on the held-out models the variants of `HELDOUT_BEYOND`), written to
bench_frontier_beyond.{csv,md,png}; ``--only KIND`` restricts it, ``--append`` adds the missing
rows to the CSV, ``--beyond --timing --append`` adds the interleaved cost of `BEYOND_TIMED`.
About 10 to 15 minutes on 2 shared cores for the four models (it was run in pieces).

``--scales 0.1,0.15,0.2,0.25``: unguided and SPARKE's default rule at each scale (everything
else default), on every model (the held-out ones too), with the prompt leak of each scale on
the conditional models; writes bench_frontier_knee.{csv,md,png} (the finer grid of the knee)
and bench_frontier_knee_seeds.{csv,md} (each seed, paired with unguided at the same seed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run by its path: python benchmarks/<name>.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rkekernels as rk
from benchmarks.common import RESULTS, Report, parser, save_figure
from benchmarks.guidance_beyond import BeyondDenoiser, beyond_settings
from benchmarks.guidance_peers import CADS, ParticleGuidance
from rkekernels.adapters.kdiffusion import guided_denoiser
from rkekernels.toy import get_sigmas_karras, sample_euler

COLUMNS = [
    "model",
    "method",
    "setting",
    "eff_classes",
    "eff_classes_sd",
    "rke",
    "rke_within",
    "rke_within_sd",
    "vendi",
    "vendi_within",
    "precision",
    "precision_sd",
    "recall",
    "consistency",
    "step_ms",
    "cost",
    "seeds",
    "moved_match",
    "moved_unrelated",
]

STEPS, SIGMA_MIN, SIGMA_MAX = 30, 0.01, 10.0
SIGMA_DATA = 0.6

MODELS = {
    "uncond": dict(kind="uncond", dominant=(0, 3, 6), keep=0.08, width=256, depth=3, seed=0),
    "cond": dict(kind="cond", width=256, depth=3, emb=16, seed=0),
    "uncond-B": dict(kind="uncond", dominant=(2, 5, 8), keep=0.08, width=320, depth=2, seed=1),
    "cond-B": dict(kind="cond", width=320, depth=2, emb=32, seed=1),
}


def cache_dir() -> Path:
    """Where trained models live: $RKEKERNELS_CACHE or ~/.cache/rkekernels, /bench_frontier."""
    root = os.environ.get("RKEKERNELS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rkekernels"
    )
    return Path(root) / "bench_frontier"


# --------------------------------------------------------------------------- data and models


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 64) float32 digits in [-1, 1] and their (1797,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data / 8.0 - 1.0, dtype=torch.float32), torch.as_tensor(d.target)


class Denoiser(nn.Module):
    """EDM-preconditioned MLP denoiser ``D(x, sigma[, cond]) = c_skip x + c_out F(c_in x, ...)``.

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``, noise input ``log(s) / 4`` through Fourier features
    (Karras et al. 2022). With ``n_classes`` a learned class embedding (``embed``) is an input;
    ``emb=`` replaces it (CADS).
    """

    def __init__(self, dim=64, width=256, depth=3, n_classes=0, emb=16, sigma_data=SIGMA_DATA):
        super().__init__()
        self.sd = sigma_data
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, emb) if n_classes else None
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32))
        layers, w_in = [], dim + 16 + (emb if n_classes else 0)
        for _ in range(depth):
            layers += [nn.Linear(w_in, width), nn.SiLU()]
            w_in = width
        layers.append(nn.Linear(w_in, dim))
        self.net = nn.Sequential(*layers)

    def embed(self, labels: Any) -> torch.Tensor:
        """(b, emb) class embeddings of integer labels (detached)."""
        with torch.no_grad():
            return self.embedding(torch.as_tensor(labels).long().reshape(-1))

    def forward(self, x, sigma, cond=None, emb=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        c_in = 1.0 / torch.sqrt(s**2 + self.sd**2)
        c_skip = self.sd**2 / (s**2 + self.sd**2)
        c_out = s * self.sd * c_in
        t = torch.log(s) / 4.0
        feats = [c_in * x, torch.sin(t * self.freqs), torch.cos(t * self.freqs)]
        if self.embedding is not None:
            if emb is None:
                emb = self.embedding(torch.as_tensor(cond).long().reshape(-1))
                emb = emb.expand(x.shape[0], -1) if emb.shape[0] == 1 else emb
            feats.append(emb)
        return c_skip * x + c_out * self.net(torch.cat(feats, 1))


def training_set(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's data: all digits (cond) or the skewed subset (uncond)."""
    x, y = digits()
    if cfg["kind"] == "cond":
        return x, y
    gen = torch.Generator().manual_seed(1234)
    keep = torch.rand(len(y), generator=gen) < cfg["keep"]
    keep |= torch.isin(y, torch.tensor(cfg["dominant"]))
    return x[keep], y[keep]


def train(cfg: dict, steps: int) -> Denoiser:
    """Train (or load from the cache) a denoiser; EDM loss, log-normal sigma (-1.2, 1.2)."""
    key = hashlib.sha256(json.dumps({**cfg, "steps": steps}, sort_keys=True).encode())
    path = cache_dir() / f"{cfg['kind']}-{key.hexdigest()[:16]}.pt"
    model = Denoiser(
        width=cfg["width"],
        depth=cfg["depth"],
        n_classes=10 if cfg["kind"] == "cond" else 0,
        emb=cfg.get("emb", 16),
    )
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(cfg["seed"])
    x, y = training_set(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,))
        x0, c = x[idx], y[idx]
        s = torch.exp(-1.2 + 1.2 * torch.randn(len(idx), 1))
        w = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2
        d = model(x0 + s * torch.randn_like(x0), s, cond=c if cfg["kind"] == "cond" else None)
        loss = (w * (d - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"  trained {cfg} in {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def classifier(steps: int = 600) -> nn.Module:
    """An MLP digit classifier (64 -> 256 -> 10) trained on 1,500 digits (cached)."""
    path = cache_dir() / f"classifier-{steps}.pt"
    net = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, 10))
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    torch.manual_seed(0)
    x, y = digits()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (128,))
        xb = x[idx] + 0.1 * torch.randn(len(idx), 64)  # a little noise: robust to samples
        loss = nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((net(x[1500:]).argmax(1) == y[1500:]).float().mean())
    print(f"  classifier: held-out accuracy {acc:.3f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


# --------------------------------------------------------------------------- measures


def effective_classes(pred: Any, n_classes: int = 10) -> float:
    """exp of the entropy of the class histogram of ``pred`` (integer labels): 1 to n_classes.

    Example:
        >>> effective_classes([0, 0, 1, 1])
        2.0
    """
    counts = np.bincount(np.asarray(pred, dtype=np.int64), minlength=n_classes).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _kth(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    d.fill_diagonal_(math.inf)
    return d.kthvalue(min(k, len(x) - 1), dim=1).values


def knn_precision_recall(real: Any, fake: Any, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkaanniemi et al. 2019).

    precision = fraction of fake points inside some real point's k-NN ball (radius: the
    distance to its k-th nearest real neighbour); recall: the same with the roles swapped.

    Example:
        >>> import torch
        >>> real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> knn_precision_recall(real, torch.tensor([[0.5], [0.6], [20.0], [20.1]]), k=1)
        (0.5, 0.0)
    """
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64)
    r_real, r_fake = _kth(real, k), _kth(fake, k)
    d = torch.cdist(fake, real)
    precision = float((d <= r_real[None]).any(1).double().mean())
    recall = float((d.T <= r_fake[None]).any(1).double().mean())
    return precision, recall


def within_class(x: torch.Tensor, labels: Any, sigma: float) -> tuple[float, float]:
    """(mean RKE, mean Vendi) over the classes with >= 2 samples, at bandwidth sigma.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [0.0], [5.0], [9.0]])
        >>> r, v = within_class(x, [0, 0, 1, 1], 1.0)
        >>> round(r, 3), round(v, 3)      # class 0: one point twice (1), class 1: two apart (2)
        (1.5, 1.5)
    """
    labels = torch.as_tensor(labels)
    rkes, vendis = [], []
    for c in labels.unique().tolist():
        xc = x[labels == c].double()
        if len(xc) >= 2:
            rkes.append(float(rk.rke_score(xc, sigma)))
            vendis.append(float(rk.vendi_score(xc, 1.0, sigma)))
    return (statistics.mean(rkes), statistics.mean(vendis)) if rkes else (1.0, 1.0)


def real_sigma(x: torch.Tensor, k: int = 10) -> float:
    """The shared bandwidth of the scores: the median k-NN distance of the real data."""
    return float(_kth(x.double(), k).median())


# --------------------------------------------------------------------------- methods


class Method:
    """One setting of one method: ``denoiser(model, sigmas, labels)`` per batch, then
    ``commit(x, labels)``; ``kind`` the method's prefix, ``setting`` a short description."""

    def __init__(self, kind: str, setting: str, **kw: Any) -> None:
        self.kind, self.setting, self.kw = kind, setting, kw
        self.guide: rk.DiversityGuidance | None = None
        self.cond_embed: Callable | None = None

    def start(self, model: Denoiser, seed: int) -> None:
        self.model, self.seed = model, seed
        if self.kind in ("sparke", "vendi"):
            self.guide = rk.DiversityGuidance(**self.kw)

    def denoiser(self, sigmas: torch.Tensor, labels: torch.Tensor | None, batch: int):
        model = self.model
        if self.kind == "none":
            return model
        if self.kind == "particle":
            return ParticleGuidance(model, self.kw["alpha"])
        if self.kind == "cads":
            return CADS(model, model.embed, sigmas, self.kw["s"], seed=1000 * self.seed + batch)
        cond = self._cond(labels)
        return guided_denoiser(model, self.guide, cond=cond, sigmas=sigmas)

    def _cond(self, labels):
        return None if labels is None else self.model.embed(labels)

    def commit(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        if self.guide is not None:
            self.guide.commit(x, self._cond(labels))


class BeyondMethod(Method):
    """A SPARKE variant of `benchmarks.guidance_beyond` (``on``, ``shape``, ``cap``)."""

    def start(self, model: Denoiser, seed: int) -> None:
        self.model, self.seed = model, seed
        self.variant = {k: self.kw[k] for k in ("on", "shape", "cap") if k in self.kw}
        self.guide = rk.DiversityGuidance(scale=self.kw["scale"])

    def denoiser(self, sigmas: torch.Tensor, labels: torch.Tensor | None, batch: int):
        return BeyondDenoiser(self.model, self.guide, cond=self._cond(labels), **self.variant)


HELDOUT_BEYOND = {
    "x0 chain rule, scale=0.5",
    "x0 chain rule, scale=1.0",
    "x0 chain rule, scale=2.0",
    "x0 chain rule, scale=3.0",
}
HELDOUT_BEYOND |= {"shape sigma, scale=0.03", "shape sigma, scale=0.1"}


def beyond_methods(conditional: bool, heldout: bool = False) -> list[Method]:
    """Issue 24 item 3: the baselines rerun (unguided, SPARKE's scale sweep, Particle
    Guidance) and the variants of `benchmarks.guidance_beyond`; on a held-out model the
    baselines near the knee and the variants that moved the tuning models' frontier
    (`HELDOUT_BEYOND`)."""
    out = [Method("none", "-"), Method("sparke", "defaults")]
    scales, alphas = (
        ((0.3,), (0.03, 0.1)) if heldout else ((0.03, 0.3, 1.0), (0.01, 0.03, 0.1, 0.3))
    )
    out += [Method("sparke", f"scale={s}", scale=s) for s in scales]
    out += [Method("particle", f"alpha={a}", alpha=a) for a in alphas]
    for k, s, kw in beyond_settings(conditional):
        if not heldout or s in HELDOUT_BEYOND:
            out.append(BeyondMethod(k, s, **kw))
    return out


def run(model: Denoiser, method: Method, seed: int, conditional: bool):
    """Sample the protocol; returns (samples, requested labels or None, seconds per step)."""
    sigmas = get_sigmas_karras(STEPS, SIGMA_MIN, SIGMA_MAX)
    gen = torch.Generator().manual_seed(seed)
    method.start(model, seed)
    if conditional:
        batches = [torch.full((4,), c) for _ in range(4) for c in range(10)]
    else:
        batches = [None] * 16
    out, labels, secs = [], [], 0.0
    for i, lab in enumerate(batches):
        b = 8 if lab is None else len(lab)
        x = SIGMA_MAX * torch.randn(b, 64, generator=gen)
        den = method.denoiser(sigmas, lab, i)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_euler(den, x, sigmas, {} if lab is None else {"cond": lab})
        secs += time.perf_counter() - t0
        method.commit(x, lab)
        out.append(x)
        if lab is not None:
            labels.append(lab)
    return torch.cat(out), (torch.cat(labels) if labels else None), secs / (len(batches) * STEPS)


def measure(x, labels, real, real_y, clf, sigma) -> dict:
    """The measures of one run (see the module docstring)."""
    with torch.no_grad():
        pred = clf(x.float()).argmax(1)
    group = pred if labels is None else labels
    rkew, vendiw = within_class(x, group, sigma)
    precision, recall = knn_precision_recall(real, x)
    if labels is not None:
        recs = [knn_precision_recall(real[real_y == c], x[labels == c])[1] for c in range(10)]
        recall = statistics.mean(recs)
    return dict(
        eff_classes=effective_classes(pred),
        rke=float(rk.rke_score(x.double(), sigma)),
        rke_within=rkew,
        vendi=float(rk.vendi_score(x.double(), 1.0, sigma)),
        vendi_within=vendiw,
        precision=precision,
        recall=recall,
        consistency=float("nan") if labels is None else float((pred == labels).float().mean()),
    )


# --------------------------------------------------------------------------- sweeps


def methods(conditional: bool, quick: bool) -> list[Method]:
    """Every setting of the sweep (reduced with quick)."""
    pick = (lambda v: v[1::2]) if quick else (lambda v: v)
    out = [Method("none", "-"), Method("sparke", "defaults")]
    for scale in pick([0.03, 0.1, 0.3, 1.0]):
        out.append(Method("sparke", f"scale={scale}", scale=scale))
    if not quick:
        for scale in (0.3, 1.0, 3.0):
            out.append(
                Method("sparke", f"scale={scale}, window 0.2-0.7", scale=scale, start=0.2, stop=0.7)
            )
    if conditional:
        for scale in pick([0.1, 0.3]):
            out.append(
                Method(
                    "sparke",
                    f"rke (prompts ignored), scale={scale}",
                    scale=scale,
                    sigma_cond=math.inf,
                )
            )
        out.append(Method("sparke", "paper step rule, scale=0.3", scale=0.3, step_rule="paper"))
    for scale in [0.3] if quick else [0.03, 0.1, 0.3, 1.0]:  # Vendi: the slowest by far
        out.append(Method("vendi", f"scale={scale}", algorithm="vendi", scale=scale))
    for alpha in pick([0.01, 0.03, 0.1, 0.3]):
        out.append(Method("particle", f"alpha={alpha}", alpha=alpha))
    if conditional:
        for s in pick([0.25, 1.0, 2.0, 4.0]):
            out.append(Method("cads", f"s={s}", s=s))
    return out


def heldout_methods(conditional: bool) -> list[Method]:
    """The held-out models' check: unguided, the defaults, and each peer near its knee."""
    out = [
        Method("none", "-"),
        Method("sparke", "defaults"),
        Method("sparke", "scale=0.3", scale=0.3),
    ]
    out.append(Method("vendi", "scale=0.3", algorithm="vendi", scale=0.3))
    out += [Method("particle", f"alpha={a}", alpha=a) for a in (0.03, 0.1)]
    if conditional:
        out.append(Method("cads", "s=1.0", s=1.0))
    return out


def prompt_leak(
    model: Denoiser, seed: int = 0, n: int = 8, jacobian: str = "identity", **kw: Any
) -> tuple[float, float]:
    """How far `DiversityGuidance(**kw)` (``jacobian`` of `guided_denoiser`; default: the
    defaults) moves a sample of a matching and of an unrelated class.

    The bank holds 16 unguided samples of class 0; n single samples (batch 1, same noise) of
    class 0 and of class 7 are drawn with and without the guidance (bank unchanged). Returns
    (mean ||guided - unguided|| for class 0, the same for class 7).
    """
    sigmas = get_sigmas_karras(STEPS, SIGMA_MIN, SIGMA_MAX)
    gen = torch.Generator().manual_seed(100 + seed)
    guide = rk.DiversityGuidance(**kw)
    zero = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        bank = sample_euler(
            model, SIGMA_MAX * torch.randn(16, 64, generator=gen), sigmas, {"cond": zero}
        )
    guide.commit(bank, model.embed(zero))
    moved = []
    for c in (0, 7):
        lab = torch.full((1,), c)
        d = []
        for _ in range(n):
            x = SIGMA_MAX * torch.randn(1, 64, generator=gen)
            with torch.no_grad():
                plain = sample_euler(model, x, sigmas, {"cond": lab})
                den = guided_denoiser(
                    model, guide, cond=model.embed(lab), sigmas=sigmas, jacobian=jacobian
                )
                guided = sample_euler(den, x, sigmas, {"cond": lab})
            d.append(float((guided - plain).norm()))
        moved.append(statistics.mean(d))
    return moved[0], moved[1]


def timing(rounds: int = 7, quick: bool = False, beyond: bool = False) -> list[dict]:
    """Cost per sampler step of each method against the plain denoiser, interleaved.

    The tuning model of each kind, a batch of 8 (4 when conditional) at sigma = 1, against a
    bank of 128 committed samples (160 conditional, 16 per class) for SPARKE / Vendi with the
    default settings (with ``beyond``: Vendi replaced by the variants of
    `benchmarks.guidance_beyond`, `BEYOND_TIMED`); per round every candidate is timed (the
    median of 20 calls) right after the plain denoiser, and the ratio is the median over
    rounds of the two times.
    """
    rows = []
    sigmas = get_sigmas_karras(STEPS, SIGMA_MIN, SIGMA_MAX)
    for mname in ("uncond", "cond"):
        cfg = MODELS[mname]
        model = train(cfg, 2500 if quick else 4000)
        cond = cfg["kind"] == "cond"
        gen = torch.Generator().manual_seed(0)
        b = 4 if cond else 8
        lab = torch.full((b,), 3) if cond else None
        kw = {"cond": lab} if cond else {}
        bank = torch.randn(160 if cond else 128, 64, generator=gen)
        bank_lab = torch.arange(160) % 10
        cands = {}
        kinds = [("sparke", {})] + ([] if beyond else [("vendi", {"algorithm": "vendi"})])
        for kind, extra in kinds:
            g = rk.DiversityGuidance(**extra)
            g.commit(bank, model.embed(bank_lab) if cond else None)
            cands[kind] = guided_denoiser(
                model, g, cond=model.embed(lab) if cond else None, sigmas=sigmas
            )
        for kind, (scale, opts) in BEYOND_TIMED.items() if beyond else ():
            g = rk.DiversityGuidance(scale=scale)
            g.commit(bank, model.embed(bank_lab) if cond else None)
            cands[kind] = BeyondDenoiser(model, g, cond=model.embed(lab) if cond else None, **opts)
        cands["particle"] = ParticleGuidance(model, 0.1)
        if cond:
            cands["cads"] = CADS(model, model.embed, sigmas, 1.0)
        x = torch.randn(b, 64, generator=gen)
        s = torch.ones(b)

        def per_call(fn, x=x, s=s, kw=kw) -> float:
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(x, s, **kw)
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3

        for fn in cands.values():  # warm-up (compilation, caches)
            per_call(fn)
        res = {k: [] for k in cands}
        base = []
        for _ in range(rounds):
            for k, fn in cands.items():
                t_base = per_call(model)
                res[k].append((per_call(fn), t_base))
                base.append(t_base)
        rows.append(
            dict(
                model=mname,
                method="none",
                setting="timing",
                step_ms=statistics.median(base),
                cost=1.0,
            )
        )
        for k, v in res.items():
            rows.append(
                dict(
                    model=mname,
                    method=k,
                    setting="timing" + _timed_setting(k),
                    step_ms=statistics.median(t for t, _ in v),
                    cost=statistics.median(t / tb for t, tb in v),
                )
            )
    return rows


BEYOND_TIMED = {  # the variants timed with --beyond --timing: (scale, BeyondDenoiser options)
    "sparke-x0jac": (2.0, dict(on="x0-jac")),
    "sparke-cap": (3.0, dict(cap=0.01)),
    "sparke-sigma": (0.03, dict(shape="sigma")),
}


def _timed_setting(kind: str) -> str:
    if kind in BEYOND_TIMED:
        scale, opts = BEYOND_TIMED[kind]
        return f" (scale={scale}, " + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")"
    return " (defaults)" if kind in ("sparke", "vendi") else ""


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "the two tuning models, fewer training steps, a reduced sweep, 1 seed")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3)")
    ap.add_argument(
        "--beyond",
        action="store_true",
        help="issue 24 item 3: the SPARKE variants and the rerun baselines "
        "(writes bench_frontier_beyond.*)",
    )
    ap.add_argument("--only", default=None, help="with --beyond: only kinds with this prefix")
    ap.add_argument(
        "--scales",
        default=None,
        help="comma-separated SPARKE scales: unguided and DiversityGuidance(scale=s) only, on "
        "every model (writes bench_frontier_knee.*)",
    )
    ap.add_argument("--timing", action="store_true", help="only the interleaved cost per step")
    ap.add_argument(
        "--append", action="store_true", help="keep the rows already in the CSV, add these"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small ops: OpenMP barriers cost more than they give
    quick = args.quick
    train_steps = 2500 if quick else 4000
    names = args.models.split(",") if args.models else (["uncond", "cond"] if quick else MODELS)
    seeds = args.seeds or (1 if quick else 3)
    name = "bench_frontier_quick" if quick else "bench_frontier"
    if args.beyond:
        name = "bench_frontier_beyond" + ("_quick" if quick else "")
    scales = [float(v) for v in args.scales.split(",")] if args.scales else None
    if scales:
        name = "bench_frontier_knee" + ("_quick" if quick else "")
    if args.timing and not args.append:
        name += "_timing"  # never over the sweep's CSV
    real, real_y = digits()
    sigma = real_sigma(real)
    rep = Report(
        RESULTS,
        name,
        "Quality-diversity frontier of diversity guidance on learned digit models",
        COLUMNS,
        notes=[
            f"shared score bandwidth: median 10-NN distance of the real digits = {sigma:.3f}",
            f"{seeds} seed(s) per setting; models trained {train_steps} steps",
        ],
        echo=True,
    )
    if args.append and (RESULTS / f"{name}.csv").exists():
        import csv

        with open(RESULTS / f"{name}.csv") as fh:
            for row in csv.DictReader(fh):
                rep.rows.append({c: _num(row.get(c, "")) for c in COLUMNS})
    if args.timing:
        for row in timing(rounds=3 if quick else 7, quick=quick, beyond=args.beyond):
            rep.add(**row)
        plot(rep.rows, name)
        return
    clf = classifier()
    per_seed = _seed_report(name, sigma) if scales else None
    unguided: dict = {}  # (model, seed) -> the unguided measures (per_seed's pairing)
    t_start = time.perf_counter()
    for mname in names:
        cfg = MODELS[mname]
        model = train(cfg, train_steps)
        conditional = cfg["kind"] == "cond"
        base_ms = None
        todo = heldout_methods(conditional) if mname.endswith("-B") else methods(conditional, quick)
        if args.beyond:
            todo = beyond_methods(conditional, heldout=mname.endswith("-B"))
            if args.only:
                todo = [m for m in todo if m.kind == "none" or m.kind.startswith(args.only)]
        if scales:
            todo = [Method("none", "-")]
            todo += [Method("sparke", f"scale={s}", scale=s) for s in scales]
        done = {(r["model"], r["method"], r["setting"]): r for r in rep.rows}  # with --append
        if (mname, "none", "-") in done:
            base_ms = done[(mname, "none", "-")]["step_ms"]
        todo = [m for m in todo if (mname, m.kind, m.setting) not in done]
        for m in todo:
            rows, step = [], []
            for seed in range(seeds):
                x, lab, sps = run(model, m, seed, conditional)
                rows.append(measure(x, lab, real, real_y, clf, sigma))
                step.append(sps * 1e3)
                if per_seed is not None:
                    _add_seed_row(per_seed, unguided, mname, m, seed, rows[-1], conditional)
            ms = statistics.median(step)
            if m.kind == "none":
                base_ms = ms
            agg = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
            for k in ("eff_classes", "rke_within", "precision"):
                agg[f"{k}_sd"] = statistics.pstdev(r[k] for r in rows)
            if conditional and m.setting == "defaults":
                agg["moved_match"], agg["moved_unrelated"] = prompt_leak(model)
            if conditional and scales and m.kind == "sparke":
                agg["moved_match"], agg["moved_unrelated"] = prompt_leak(model, **m.kw)
            if conditional and m.kind == "sparke-x0jac" and m.kw["scale"] <= 1.0:
                leak = prompt_leak(model, jacobian="vjp", scale=m.kw["scale"])
                agg["moved_match"], agg["moved_unrelated"] = leak
            rep.add(
                model=mname,
                method=m.kind,
                setting=m.setting,
                step_ms=ms,
                cost=ms / base_ms,
                seeds=seeds,
                **agg,
            )
    if not args.models and not args.beyond and not scales:
        for row in timing(rounds=3 if quick else 7, quick=quick):
            rep.add(**row)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    plot(rep.rows, name)


SEED_COLUMNS = [
    "model",
    "method",
    "setting",
    "seed",
    "eff_classes",
    "rke_within",
    "precision",
    "recall",
    "consistency",
    "diversity_vs_none",
    "precision_vs_none",
    "consistency_vs_none",
]


def _seed_report(name: str, sigma: float) -> Report:
    """``--scales``: every seed's measures and their ratio to unguided at the same seed (the
    same initial noise), written to <name>_seeds.{csv,md}."""
    return Report(
        RESULTS,
        f"{name}_seeds",
        "The knee's finer grid, seed by seed (paired with unguided at the same seed)",
        SEED_COLUMNS,
        notes=[
            f"shared score bandwidth {sigma:.3f}; *_vs_none: this seed's value over unguided's "
            "at the same seed (diversity: effective classes unconditional, within-class RKE "
            "conditional)"
        ],
    )


def _add_seed_row(rep, unguided, mname, m, seed, r, conditional) -> None:
    if m.kind == "none":
        unguided[(mname, seed)] = r
    base = unguided[(mname, seed)]
    div = "rke_within" if conditional else "eff_classes"
    rep.add(
        model=mname,
        method=m.kind,
        setting=m.setting,
        seed=seed,
        eff_classes=r["eff_classes"],
        rke_within=r["rke_within"],
        precision=r["precision"],
        recall=r["recall"],
        consistency=r["consistency"],
        diversity_vs_none=r[div] / base[div],
        precision_vs_none=r["precision"] / base["precision"],
        consistency_vs_none=r["consistency"] / base["consistency"],
    )


def _num(v: str) -> Any:
    try:
        return float(v) if v != "" else float("nan")
    except ValueError:
        return v


BEYOND_PLOTTED = ("none", "sparke", "particle", "sparke-x0jac", "sparke-sigma", "sparke-cskip")


def plot(rows: list[dict], name: str) -> None:
    """Frontier plots: diversity against precision, one panel per model (the beyond run: the
    kinds of `BEYOND_PLOTTED`; the others are in its table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not str(r["setting"]).startswith("timing")]
    if name.startswith("bench_frontier_beyond"):
        rows = [r for r in rows if r["method"] in BEYOND_PLOTTED]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    colours = dict(none="k", sparke="C0", vendi="C2", particle="C1", cads="C3")
    extra = [k for k in dict.fromkeys(r["method"] for r in rows) if k not in colours]
    colours.update({k: f"C{4 + i}" for i, k in enumerate(extra)})
    for ax, mname in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["model"] == mname]
        cond = "cond" in mname and "uncond" not in mname
        key = "rke_within" if cond else "eff_classes"
        for kind, c in colours.items():
            pts = [r for r in sub if r["method"] == kind]
            if not pts:
                continue
            pts.sort(key=lambda r: r["precision"], reverse=True)
            ax.plot(
                [r["precision"] for r in pts],
                [r[key] for r in pts],
                "o-" if kind != "none" else "s",
                color=c,
                label=kind,
                ms=4,
            )
            for r in pts:
                if r["setting"] == "defaults":
                    ax.plot(r["precision"], r[key], "*", color=c, ms=14)
        ax.set_xlabel("k-NN precision (k = 3)")
        ax.set_ylabel("within-class RKE" if cond else "effective classes")
        ax.set_title(mname)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, f"{name}.png")


if __name__ == "__main__":
    main()
