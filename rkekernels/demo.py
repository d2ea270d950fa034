"""``rkekernels demo``: SPARKE guidance on a diffusion model whose truth is known exactly.

The model is `rkekernels.toy.PromptWorld`: prompts are points of an 8-D embedding space, each
prompt's data is a Gaussian mixture in a latent plane (2-D, or embedded in ``--dim`` dimensions)
with one dominant mode (weight 0.8) and rare ones, and prompts with nearby embeddings share
modes. Its denoiser E[x0 | x_sigma, prompt] is exact, so an Euler sampler reproduces the data
distribution, and every sample can be checked against the true modes.

For each prompt the same initial noise (seeds) is sampled

- unguided,
- with SPARKE guidance one sample per call (each finished sample committed to the bank), and
- with SPARKE guidance in batches of ``--batch`` (the other samples of a batch count too),

through the public adapters only: `DiversityGuidance` (prompt-aware: conditional on
the prompt embeddings with bandwidth ``--sigma-cond``) wrapped around the denoiser by
`rkekernels.adapters.kdiffusion.guided_denoiser`, inside a k-diffusion style Euler loop
(`rkekernels.toy.sample_euler`). Prompts are interleaved, as requests to a server would be.

Printed per prompt and overall: modes covered (of the true count), the RKE score of the samples
(and the conditional RKE given the prompts, overall), precision (fraction of samples within
3 std of a true mode of their own prompt) and the guidance overhead as a percentage of the
sampling time. The demo checks its own claim: guidance must cover clearly more modes
(at least max(2, 10% of the true modes) more) at a precision within 10% of unguided, and it says
so explicitly when a setting does not. A PNG shows true modes, unguided and guided samples.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import CLIError
from ._files import figure_path
from .adapters.kdiffusion import guided_denoiser
from .sampling import DiversityGuidance
from .scores import cond_rke_score, rke_score
from .toy import PromptWorld, get_sigmas_karras, sample_euler

__all__ = ["DemoConfig", "DemoResult", "add_arguments", "main", "run"]

METHODS = ("unguided", "guided", "guided_batch")


@dataclass
class DemoConfig:
    """Settings of the demo (the command-line options; defaults run in a few seconds).

    Attributes:
        samples: samples per prompt and method. prompts: number of prompts (groups of 2 share
            modes). modes: true modes per prompt. dominant: weight of each prompt's main mode.
        steps: Euler steps (Karras schedule from sigma_max to sigma_min, then 0).
        seed: seeds the initial noise (the world layout is fixed by ``world_seed``).
        scale: guidance weight in score space (`guided_denoiser`'s raw scale).
        sigma: kernel bandwidth on the (unnormalised) latent features, in latent units.
        sigma_cond: kernel bandwidth on prompt embeddings (prompt-aware guidance).
        start, stop: the guidance window on the sampler's progress (step / steps).
        objective: "log1p" (default) guides along -grad log(1 + 2 S), "log" along the
            library's default -grad log S (see `rkekernels.guidance_defaults.OBJECTIVES`).
        step_rule: "prompt_fade" (default) or "paper" (see `DiversityGuidance`).
        batch: batch size of the batched guided run.
        dim: latent dimension (2, or more: the plane embedded by a fixed orthonormal basis).
        out: path of the PNG ("" for none). progress: tqdm bars on stderr.
    """

    samples: int = 16
    prompts: int = 4
    modes: int = 5
    dominant: float = 0.9
    steps: int = 30
    seed: int = 0
    scale: float = 0.4
    sigma: float = 0.6
    sigma_cond: float = 0.5
    start: float = 0.35
    stop: float = 0.55
    objective: str = "log1p"
    step_rule: str = "prompt_fade"
    batch: int = 4
    dim: int = 2
    std: float = 0.1
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    world_seed: int = 0
    out: str = "demo_out/demo.png"
    progress: bool = True


@dataclass
class MethodStats:
    """Statistics of one method on one prompt (or overall)."""

    covered: int
    true_modes: int
    rke: float
    precision: float
    seconds: float
    cond_rke: float = float("nan")


@dataclass
class DemoResult:
    """What `run` returns: the samples, the statistics and the verdicts.

    Attributes:
        config: the `DemoConfig` used.
        samples: {method: [(samples, dim) tensor per prompt]} for "unguided", "guided",
            "guided_batch".
        per_prompt: {method: [MethodStats per prompt]}. overall: {method: MethodStats}.
        overhead: {"guided": %, "guided_batch": %} extra sampling time over unguided sampling
            of the same calls (sequential vs sequential, batched vs batched).
        verdicts: {method: (ok, message)}. figure: the PNG path or None.
        rke_sigma: bandwidth used for the RKE of results (3 std of the components).
    """

    config: DemoConfig
    samples: dict[str, list[torch.Tensor]]
    per_prompt: dict[str, list[MethodStats]]
    overall: dict[str, MethodStats]
    overhead: dict[str, float]
    verdicts: dict[str, tuple[bool, str]]
    rke_sigma: float
    figure: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every guided setting covers clearly more modes at kept precision."""
        return all(ok for ok, _ in self.verdicts.values())


def _bar(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (rkekernels[demo]); run without a bar
        enabled = False
    if not enabled:

        class _Null:
            def update(self, n: int = 1) -> None:
                pass

            def set_description_str(self, s: str) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, leave=False)


def _validate(cfg: DemoConfig) -> None:
    ints = {"samples": 1, "prompts": 1, "modes": 2, "steps": 2, "batch": 1, "dim": 2}
    for name, lo in ints.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    for name in ("sigma", "sigma_cond", "std", "sigma_min", "sigma_max"):
        v = getattr(cfg, name)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")
    if not math.isfinite(cfg.scale) or cfg.scale < 0:
        raise ValueError(f"scale must be finite and >= 0, got {cfg.scale!r}")
    if not 0.0 <= cfg.start <= cfg.stop <= 1.0:
        raise ValueError(f"need 0 <= start <= stop <= 1, got start={cfg.start}, stop={cfg.stop}")
    if not 0.0 < cfg.dominant < 1.0:
        raise ValueError(f"dominant must be in (0, 1), got {cfg.dominant}")
    if cfg.objective not in ("log1p", "log"):
        raise ValueError(f"objective must be 'log1p' or 'log', got {cfg.objective!r}")
    if cfg.step_rule not in ("prompt_fade", "paper"):
        raise ValueError(f"step_rule must be 'prompt_fade' or 'paper', got {cfg.step_rule!r}")


def run(cfg: DemoConfig | None = None, **overrides: Any) -> DemoResult:
    """Run the demo: sample every prompt unguided and guided, measure, plot.

    Args:
        cfg: a `DemoConfig` (default settings when None).
        **overrides: fields of `DemoConfig` to change (e.g. ``samples=8, out=""``).

    Returns:
        A `DemoResult`; print it with `format_report`.

    Raises:
        ValueError: a setting out of range.

    Example:
        >>> from rkekernels.demo import run
        >>> res = run(samples=4, prompts=2, steps=12, out="", progress=False)
        >>> sorted(res.overall), res.overall["unguided"].true_modes
        (['guided', 'guided_batch', 'unguided'], 10)
    """
    cfg = DemoConfig() if cfg is None else cfg
    if overrides:
        cfg = DemoConfig(**{**asdict(cfg), **overrides})
    _validate(cfg)
    world = PromptWorld(
        cfg.prompts,
        cfg.modes,
        dominant=cfg.dominant,
        std=cfg.std,
        dim=cfg.dim,
        seed=cfg.world_seed,
    )
    samples, timings = _sample_all(cfg, world)
    seconds = {m: timings[m] for m in samples}
    rke_sigma = 3.0 * cfg.std
    per_prompt, overall = _measure(cfg, world, samples, seconds, rke_sigma)
    t = timings
    overhead = {
        "guided": 100.0 * (t["guided"] - t["unguided"]) / t["unguided"],
        "guided_batch": 100.0 * (t["guided_batch"] - t["unguided_batch"]) / t["unguided_batch"],
    }
    total_modes = sum(world.n_modes(p) for p in range(world.n_prompts))
    result = DemoResult(
        config=cfg,
        samples=samples,
        per_prompt=per_prompt,
        overall=overall,
        overhead=overhead,
        verdicts=_verdicts(overall, total_modes),
        rke_sigma=rke_sigma,
        timings=timings,
    )
    if cfg.out:
        result.figure = plot(result, world, cfg.out)
    return result


def _sample_all(cfg: DemoConfig, world: Any) -> tuple[dict, dict[str, float]]:
    """Every prompt sampled four ways (unguided / SPARKE, one by one / batched), interleaved.

    Returns ({"unguided", "guided", "guided_batch"}: per-prompt samples, CPU seconds of the four
    runs, and "warm_up": wall seconds of the untimed first guided calls). The batched unguided
    run must equal the one-by-one run (same seeds): checked here.
    """
    sigmas = get_sigmas_karras(cfg.steps, cfg.sigma_min, cfg.sigma_max)
    P, N = world.n_prompts, cfg.samples
    noise = [
        sigmas[0]
        * torch.randn(N, cfg.dim, generator=torch.Generator().manual_seed(cfg.seed * 7919 + p))
        for p in range(P)
    ]
    emb = world.embeddings
    bar = _bar(4 * P * N, cfg.progress, "sampling")

    def guidance() -> DiversityGuidance:
        return DiversityGuidance(
            cfg.sigma,
            objective=cfg.objective,
            step_rule=cfg.step_rule,
            sigma_cond=cfg.sigma_cond,
            scale=cfg.scale,
            start=cfg.start,
            stop=cfg.stop,
            normalize=False,
            capacity=max(1000, P * N),
        )

    def sample(batch: int, guide: DiversityGuidance | None):
        outs: list[list[torch.Tensor]] = [[] for _ in range(P)]
        t0 = time.process_time()  # CPU time of this process: robust to other jobs here
        for i0 in range(0, N, batch):  # prompts interleaved, as requests to a server
            for p in range(P):
                z = noise[p][i0 : i0 + batch]
                model = world.denoise
                if guide is not None:
                    cond = emb[p].expand(z.shape[0], -1)
                    model = guided_denoiser(world.denoise, guide, cond=cond, sigmas=sigmas)
                x = sample_euler(model, z, sigmas, {"cond": p})
                if guide is not None:
                    guide.commit(x, cond)
                outs[p].append(x)
                bar.update(z.shape[0])
        return [torch.cat(o) for o in outs], time.process_time() - t0

    def warm_up() -> float:
        """One guided sample one by one and one batch, untimed: the first guided call compiles
        the fused CPU kernel (numba; a few seconds in a fresh environment, then read from its
        disk cache), which is not sampling time. Returns the wall seconds it took."""
        t0 = time.perf_counter()
        guide = guidance()
        for batch in (1, cfg.batch):
            z, cond = noise[0][:batch], emb[0].expand(min(batch, N), -1)
            model = guided_denoiser(world.denoise, guide, cond=cond, sigmas=sigmas)
            guide.commit(sample_euler(model, z, sigmas, {"cond": 0}), cond)
        return time.perf_counter() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and makes CPU time honest
    try:
        bar.set_description_str("warm-up (compiles the CPU kernel once)")
        t_warm = warm_up()
        bar.set_description_str("unguided, one by one")
        unguided, t_u1 = sample(1, None)
        bar.set_description_str("SPARKE, one by one")
        guided, t_g1 = sample(1, guidance())
        bar.set_description_str("unguided, batched")
        unguided_b, t_ub = sample(cfg.batch, None)
        bar.set_description_str(f"SPARKE, batches of {cfg.batch}")
        guided_b, t_gb = sample(cfg.batch, guidance())
    finally:
        bar.close()
        torch.set_num_threads(threads)
    for p in range(P):  # batching changes nothing without guidance: the same seeds, same samples
        torch.testing.assert_close(unguided_b[p], unguided[p])
    samples = {"unguided": unguided, "guided": guided, "guided_batch": guided_b}
    timings = {"unguided": t_u1, "guided": t_g1, "unguided_batch": t_ub, "guided_batch": t_gb,
               "warm_up": t_warm}  # fmt: skip
    return samples, timings


def _measure(
    cfg: DemoConfig, world: Any, samples: dict, seconds: dict[str, float], rke_sigma: float
) -> tuple[dict[str, list[MethodStats]], dict[str, MethodStats]]:
    """Modes covered, RKE and precision of each method, per prompt and over all prompts."""
    P, N = world.n_prompts, cfg.samples
    per_prompt: dict[str, list[MethodStats]] = {}
    overall: dict[str, MethodStats] = {}
    cond_all = world.embeddings.repeat_interleave(N, dim=0)
    total_modes = sum(world.n_modes(p) for p in range(P))
    for m, xs in samples.items():
        stats = []
        for p, x in enumerate(xs):
            gm = world.mixture(p)
            stats.append(
                MethodStats(
                    covered=gm.modes_covered(x),
                    true_modes=gm.n_components,
                    rke=float(rke_score(x.double(), rke_sigma)),
                    precision=gm.precision(x),
                    seconds=seconds[m] / P,
                )
            )
        per_prompt[m] = stats
        x_all = torch.cat(xs).double()
        overall[m] = MethodStats(
            covered=sum(s.covered for s in stats),
            true_modes=total_modes,
            rke=float(rke_score(x_all, rke_sigma)),
            precision=sum(s.precision for s in stats) / P,
            seconds=seconds[m],
            cond_rke=float(cond_rke_score(x_all, cond_all.double(), rke_sigma, cfg.sigma_cond)),
        )
    return per_prompt, overall


def _verdicts(overall: dict[str, MethodStats], total_modes: int) -> dict[str, tuple[bool, str]]:
    """Per guided method: clearly more modes (+10% of all, at least 2) at precision within 10%."""
    need = max(2, math.ceil(0.1 * total_modes))
    verdicts = {}
    base = overall["unguided"]
    for m in ("guided", "guided_batch"):
        o = overall[m]
        more = o.covered - base.covered
        kept = o.precision >= 0.9 * base.precision
        ok = more >= need and kept
        what = f"{o.covered}/{total_modes} modes vs {base.covered}/{total_modes} unguided"
        prec = f"precision {o.precision:.2f} vs {base.precision:.2f}"
        if ok:
            msg = f"OK: {what} (+{more}), {prec} (within 10%)"
        else:
            why = []
            if more < need:
                why.append(f"not clearly more modes (+{more}, needs +{need})")
            if not kept:
                why.append("precision dropped by more than 10%")
            msg = f"NOT MET with these settings: {what}, {prec}: " + " and ".join(why)
        verdicts[m] = (ok, msg)
    return verdicts


_LABELS = {
    "unguided": "unguided",
    "guided": "SPARKE one by one",
    "guided_batch": "SPARKE batch={b}",
}


def _label(m: str, cfg: DemoConfig) -> str:
    return _LABELS[m].format(b=cfg.batch)


def format_report(res: DemoResult) -> str:
    """The printed report: settings, a table per prompt, the overall table, the verdicts."""
    cfg = res.config
    P = len(res.per_prompt["unguided"])
    lines = [
        "SPARKE diversity guidance on an exact prompt-conditioned diffusion model "
        "(rkekernels.toy.PromptWorld)",
        f"  {P} prompts (pairs of close prompts share modes), {cfg.modes} true modes each "
        f"(dominant weight {cfg.dominant}), latent dim {cfg.dim}, {cfg.samples} samples per "
        f"prompt and method, Euler {cfg.steps} steps, seed {cfg.seed}",
        f"  guidance (guided_denoiser, score space): scale {cfg.scale}, sigma {cfg.sigma}, "
        f"sigma_cond {cfg.sigma_cond}, window {cfg.start}-{cfg.stop} of the trajectory, "
        f"objective {'-grad log(1 + 2S)' if cfg.objective == 'log1p' else '-grad log S'}",
        f"  RKE bandwidth {res.rke_sigma:g} (3 std); precision = fraction within 3 std of a true "
        "mode of the sample's own prompt",
        "",
    ]
    w = max(len(_label(m, cfg)) for m in METHODS)
    head = f"  {'method':<{w}}  {'modes':>7}  {'RKE':>6}  {'precision':>9}"
    for p in range(P):
        lines.append(f"prompt {p}")
        lines.append(head)
        for m in METHODS:
            s = res.per_prompt[m][p]
            lines.append(
                f"  {_label(m, cfg):<{w}}  {f'{s.covered}/{s.true_modes}':>7}  {s.rke:6.2f}  "
                f"{s.precision:9.2f}"
            )
        lines.append("")
    lines.append(f"overall ({P} prompts x {cfg.samples} samples)")
    lines.append(f"{head}  {'cond RKE':>8}  {'time':>7}  {'overhead':>8}")
    for m in METHODS:
        s = res.overall[m]
        ov = "-" if m == "unguided" else f"{res.overhead[m]:+.0f}%"
        lines.append(
            f"  {_label(m, cfg):<{w}}  {f'{s.covered}/{s.true_modes}':>7}  {s.rke:6.2f}  "
            f"{s.precision:9.2f}  {s.cond_rke:8.2f}  {s.seconds:6.2f}s  {ov:>8}"
        )
    t = res.timings
    calls = cfg.prompts * cfg.samples * cfg.steps
    per_call = 1e3 * (t["guided"] - t["unguided"]) / max(1, calls)
    lines += [
        "",
        "  overhead = extra sampling time over unguided sampling of the same calls "
        f"(batched vs batched: unguided batched took {t['unguided_batch']:.2f}s). The toy "
        "denoiser is a few microseconds per call, so the percentage is large here; in absolute "
        f"terms guidance adds ~{per_call:.2f} ms per sampler step (one by one), negligible next "
        f"to a real denoiser network. Not counted: the first guided calls, {t['warm_up']:.2f}s "
        "(they compile the fused CPU kernel where numba's disk cache does not have it yet).",
        "",
    ]
    for m in ("guided", "guided_batch"):
        lines.append(f"{_label(m, cfg)}: {res.verdicts[m][1]}")
    if res.figure:
        lines.append(f"figure: {res.figure}")
    return "\n".join(lines)


def plot(res: DemoResult, world: Any, out: str) -> str:
    """Save a PNG: per prompt (rows), the true modes and the samples of each method (columns).

    Returns:
        The path written (absolute).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    cfg = res.config
    P = len(res.per_prompt["unguided"])
    cols = ["true", *METHODS]
    fig, axes = plt.subplots(P, len(cols), figsize=(3.0 * len(cols), 3.0 * P), squeeze=False)
    all_modes = world.plane_means.numpy()
    gen = torch.Generator().manual_seed(cfg.seed)
    for p in range(P):
        gm = world.mixture(p)
        own = world.plane_means[world.prompt_modes[p]].numpy()
        # zoom on the prompt's flower, wide enough to show every sample (none is hidden)
        centre = world.plane_means[world.prompt_modes[p][0]]
        half = world.petal_radius + 8.0 * world.std
        for m in METHODS:
            off = (world.to_plane(res.samples[m][p]) - centre).abs().max()
            half = max(half, float(off) + 2.0 * world.std)
        cx, cy = float(centre[0]), float(centre[1])
        for c, col in enumerate(cols):
            ax = axes[p][c]
            ax.scatter(all_modes[:, 0], all_modes[:, 1], s=6, c="0.85", zorder=1)
            for k, (mx, my) in enumerate(own):
                ax.add_patch(
                    Circle(
                        (mx, my),
                        3.0 * world.std,
                        fill=False,
                        lw=2.0 if k == 0 else 1.0,
                        ec="tab:green" if k == 0 else "tab:olive",
                        zorder=2,
                    )
                )
            if col == "true":
                pts = world.to_plane(gm.sample(400, generator=gen)).numpy()
                ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.3, c="k", zorder=3)
                title = f"prompt {p}: true ({gm.n_components} modes)"
            else:
                pts = world.to_plane(res.samples[col][p]).numpy()
                color = "tab:blue" if col == "unguided" else "tab:red"
                ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.7, c=color, zorder=3)
                s = res.per_prompt[col][p]
                title = (
                    f"{_label(col, cfg)}\n{s.covered}/{s.true_modes} modes, prec {s.precision:.2f}"
                )
            ax.set_title(title, fontsize=9)
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy - half, cy + half)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        "true modes (circles: 3 std, thick = dominant), unguided and SPARKE-guided samples "
        "from the same seeds",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path.resolve())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (used by ``rkekernels demo``)."""
    d = DemoConfig()
    a = parser.add_argument
    a("--samples", type=int, default=d.samples, help="samples per prompt and method")
    a("--prompts", type=int, default=d.prompts, help="number of prompts (pairs share modes)")
    a("--modes", type=int, default=d.modes, help="true modes per prompt")
    a("--steps", type=int, default=d.steps, help="Euler sampling steps")
    a("--seed", type=int, default=d.seed, help="seed of the initial noise")
    a("--scale", type=float, default=d.scale, help="guidance scale (score space)")
    a("--sigma", type=float, default=d.sigma, help="feature kernel bandwidth (latent units)")
    a("--sigma-cond", type=float, default=d.sigma_cond, help="prompt kernel bandwidth")
    a("--start", type=float, default=d.start, help="guidance starts at this progress in [0, 1]")
    a("--stop", type=float, default=d.stop, help="guidance stops at this progress in [0, 1]")
    a(
        "--objective",
        choices=("log1p", "log"),
        default=d.objective,
        help="guide along -grad log(1 + 2S) (default) or the plain -grad log S",
    )
    a(
        "--step-rule",
        choices=("prompt_fade", "paper"),
        default=d.step_rule,
        help="fade the step for prompts unrelated to the bank (default) or the paper's step",
    )
    a("--batch", type=int, default=d.batch, help="batch size of the batched guided run")
    a("--dim", type=int, default=d.dim, help="latent dimension (2, or more: an embedded plane)")
    a(
        "--out",
        default=d.out,
        help="figure path ending in .png (.pdf, .svg, ...), or an existing folder to write "
        "demo.png into; '' for no figure",
    )
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run the demo from parsed ``rkekernels demo`` options (or an argv list); print the report.

    Returns:
        0 (the verdict lines say whether guidance met its claim with these settings).
    """
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="rkekernels demo")
        add_arguments(parser)
        args = parser.parse_args(args)
    if args.out:  # before the run: a folder gets demo.png, a name needs its suffix
        args.out = str(figure_path(args.out, "--out", "demo.png"))
    fields = DemoConfig.__dataclass_fields__
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        res = run(cfg)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
