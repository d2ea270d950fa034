"""``rkekernels evaluate``: score folders of generated images as researchers do.

    rkekernels evaluate GEN [--reference REF] [--prompts FILE] [--encoder NAME] [--sigma S ...]
                        [--null-draws N] [--seed S] [--json] [--out DIR]

One bandwidth for every comparison: with --reference and no --sigma, GEN is scored at REF's
`default_bandwidth`, so runs against one reference share sigma and compare (``sigma_from`` in
the JSON and the first printed line say where sigma came from: reference, generated or given).

GEN and REF are folders of images (png, jpg, jpeg, webp, bmp; read with Pillow, sorted by
their path inside the folder; hidden entries and folders of earlier reports are left out) or
embedding files (the formats of ``rkekernels score``: .npy, .npz, .pt/.pth, .safetensors; then
"files" are row indices). Images are embedded with the chosen encoder
(`rkekernels.adapters.encoders`, default ``dinov2``) a batch at a time (memory holds the
features, not the images; the bar shows images per second); embeddings are cached on disk,
keyed by the encoder and each file's content (blake2b of its bytes), so a second run encodes
nothing (it does not even load the model). The cache is written as the run goes, so an
interrupted run resumes, and several processes may share it (`rkekernels.evaluation.cache`). A
damaged cache is rebuilt; a cache folder that cannot be written gives one warning and the run
goes on without it. ``RKEKERNELS_DECODE_WORKERS=N`` decodes images in N processes (default 0).

``--prompts`` gives one prompt per image: a .txt file (one per line, in sorted file order), a
.csv with a file column (file/filename/image/path) and a prompt column (prompt/caption/text),
matched by file name, a one-column .csv (sorted order), or an embedding file (n, m). Text is
embedded with CLIP's text tower whatever the image encoder is (``--text-model``).

The result (``--json`` prints it as one object) holds n, sigma, encoder, rke (with a jackknife
interval), vendi (order 1, Gaussian at sigma), modes ([{weight, files}]), the most and least
crowded samples (largest / smallest s_i = sum_j k(x_i, x_j)^2); with prompts cond_rke and
cond_vendi; with a reference novelty (KEN), novel_modes, relative_rke and the novelty null
(novelty_null {mean, std, draws} and novelty_p: KEN of --null-draws reference splits, when REF
holds at least twice as many samples as GEN). Only modes that hold samples are listed, each with
its sigma. Several ``--sigma`` give lists, and every printed value names its sigma. ``--out DIR``
writes report.md with a grid of the top modes, the most and least crowded samples, a bandwidth
sweep plot and results.json into DIR, each file atomically. DIR must be new, empty or an
earlier report's folder (checked before any work): a report never deletes or overwrites a file
it did not write.

Bad input (a folder with no images, an unreadable image, prompts that do not match, an unknown
encoder, weights missing offline) prints one line and exits with code 2. Images are checked
before any encoder loads; the weights of a hub encoder are looked up in the Hugging Face cache
before transformers is imported, and when they are not there one connection to the hub (3 s at
most, no retries) decides between downloading them and the one line.

Several processes: ``torchrun --nproc_per_node=P -m rkekernels evaluate ...`` (and several
nodes) starts a process group (gloo; NCCL with ``--device cuda``, one GPU per rank); each rank
encodes every P-th file, the scores are split over the ranks
(`rkekernels.evaluation.ranks`), and rank 0 alone prints and writes the report.

The scores come from `rkekernels.evaluation.evaluate`, the report from `rkekernels.cli.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from .._errors import CLIError
from ..evaluation import default_cache_dir, evaluate, ranks
from ._common import EXIT_BAD_INPUT, add_max_bytes, positive
from .report import check_out_dir, fmt, write_report

__all__ = ["add_arguments", "run"]

HELP = "evaluate folders of generated images: RKE, Vendi, intervals, novelty, report"
DESCRIPTION = (
    "Embed a folder of images (or read embeddings), print RKE with its interval, "
    "Vendi, modes, conditional scores (--prompts) and novelty (--reference); --out DIR "
    "writes a report."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``rkekernels evaluate``."""
    a = p.add_argument
    a("gen", metavar="GEN", help="folder of generated images, or an embedding file (n, d)")
    a("--reference", metavar="REF", help="reference images or embeddings (novelty, relative RKE)")
    a("--prompts", metavar="FILE", help="prompts: .txt (one per line), .csv, or embeddings")
    a("--encoder", default="dinov2", help="dinov2 (default), clip, inception or pixels")
    a("--encoder-model", metavar="ID", help="weights: hub id or local folder (default per encoder)")
    a("--text-model", metavar="ID", help="CLIP weights for the prompts (default: CLIP ViT-L/14)")
    a("--sigma", type=positive, nargs="+", action="extend", metavar="S", help="bandwidth(s)")
    a("--sigma-t", type=positive, metavar="S", help="bandwidth for the prompt embeddings")
    a("--top", type=int, default=8, help="number of modes reported")
    a("--per-mode", type=int, default=8, help="files listed per mode")
    a("--unbiased", action="store_true", help="unbiased (off-diagonal) interval estimator")
    a(
        "--null-draws",
        type=int,
        default=199,
        metavar="N",
        help="novelty null: reference splits "
        "(default 199, p >= 0.005; 0: off; needs a reference of >= 2x the set)",
    )
    a("--seed", type=int, default=0, metavar="S", help="seed of the novelty null's splits")
    a("--json", action="store_true", help="print one JSON object")
    a(
        "--out",
        metavar="DIR",
        help="write a report (Markdown, figures, JSON) into DIR: a new or empty folder, or "
        "an earlier report's (only the report's own files are replaced)",
    )
    a("--cache", metavar="DIR", help=f"embedding cache (default: {default_cache_dir()})")
    a("--no-cache", action="store_true", help="do not read or write the embedding cache")
    a("--batch-size", type=int, default=32, help="images per encoder batch")
    a("--device", default="cpu", help="encoder device (cpu, cuda, ...)")
    a("--half", action="store_true", help="run the encoder in float16")
    a("--key", metavar="NAME", help="array name in multi-array embedding files")
    add_max_bytes(p)
    a(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``rkekernels evaluate`` from parsed options; print the result; 0 on success."""
    for name in ("top", "per_mode", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    if args.null_draws < 0:
        raise CLIError(
            f"--null-draws must be >= 0 (0 turns the novelty null off); got {args.null_draws}"
        )
    with ranks.session(args.device) as (rank, device):  # torchrun: one process group
        args.device = device
        try:
            return _run(args, rank == 0)
        except CLIError:
            if rank:  # rank 0 alone prints (every rank raises the same error)
                return EXIT_BAD_INPUT
            raise


def _run(args: argparse.Namespace, root: bool) -> int:
    """Evaluate on every rank; print and write the report on rank 0 (``root``) alone."""
    if args.out:  # before any work: a report never overwrites what it did not write
        ranks.on_root(check_out_dir, args.out, [args.gen, args.reference, args.prompts])
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    cache = None if args.no_cache else (args.cache or "default")
    keep: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        res = _evaluate(args, cache, progress and root, keep)
    if not root:
        return 0
    for w in caught:  # ours (a cache that cannot be written): one line each, once
        if issubclass(w.category, RuntimeWarning):
            print(f"rkekernels: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.json:
        print(json.dumps(res))
    else:
        _print(res, args.null_draws)
    if args.out:  # after the scores: a failure here still leaves them printed
        sys.stdout.flush()
        try:
            report = write_report(res, args.out, keep)
        except OSError as exc:
            raise CLIError(f"--out {args.out}: cannot write the report: {exc}") from None
        print(f"report: {report}", file=sys.stderr)
    return 0


#: the options that `rkekernels.evaluation.evaluate` takes under their own names
_PASSED = (
    "encoder", "encoder_model", "text_model", "sigma", "sigma_t", "top", "per_mode", "unbiased",
    "batch_size", "device", "half", "key", "max_bytes", "null_draws", "seed",
)  # fmt: skip


def _evaluate(args: argparse.Namespace, cache, progress: bool, keep: dict) -> dict[str, Any]:
    """`rkekernels.evaluation.evaluate` with the options of ``args``."""
    passed = {name: getattr(args, name) for name in _PASSED}
    keep = keep if args.out else None
    return evaluate(args.gen, args.reference, args.prompts, cache_dir=cache, progress=progress,
                    _keep=keep, **passed)  # fmt: skip


_FROM = {
    "given": "given",
    "reference": "from the reference: its default_bandwidth",
    "generated": "from GEN: its default_bandwidth (give --reference to share one)",
}


def _print(res: dict[str, Any], null_draws: int) -> None:
    """The console summary; with several --sigma every value is printed with its sigma."""
    sig = res["sigma"] if isinstance(res["sigma"], list) else [res["sigma"]]
    many = isinstance(res["sigma"], list)

    def at(key, i):  # the value of ``key`` at the i-th sigma
        return res[key][i] if many else res[key]

    print(f"n = {res['n']}  encoder = {res['encoder']}  sigma = {fmt(res['sigma'])}  "
          f"({_FROM[res['sigma_from']]})")  # fmt: skip
    ci = res["rke_interval"]
    for i, s in enumerate(sig):
        lab = f" (sigma {fmt(s)})" if many else ""
        est = f"unbiased {fmt(_at(ci['estimate'], i))} " if ci["unbiased"] else ""
        low, high = fmt(_at(ci["low"], i)), fmt(_at(ci["high"], i))
        print(f"RKE{lab}   = {fmt(at('rke', i))}  {est}[{low}; {high}]")
        print(f"Vendi{lab} = {fmt(at('vendi', i))}")
        if "cond_rke" in res:
            print(
                f"cond RKE{lab} = {fmt(at('cond_rke', i))}  cond Vendi = {fmt(at('cond_vendi', i))}"
            )
        if "relative_rke" in res:
            print(f"relative RKE{lab} = {fmt(at('relative_rke', i))}")
    if "novelty" in res:
        _print_novelty(res, null_draws, f", sigma {fmt(sig[0])}" if many else "")
    for i, m in enumerate(res["modes"][:5]):
        files = ", ".join(str(f) for f in m["files"][:4])
        print(f"mode {i + 1} (sigma {fmt(m['sigma'])}): weight {m['weight']:.3f}  {files}")
    approx = res.get("methods_error", {})
    for name, err in approx.items():  # the exact paths go unmentioned (see --json's methods)
        print(f"{name}: {res['methods'][name]} (kernel-entry error <= {err:.2g}; exact too slow)")
    c = res["cache"]
    print(f"embeddings: {c['encoded']} encoded, {c['cached']} from the cache")


def _at(v, i):
    return v[i] if isinstance(v, list) else v


def _print_novelty(res: dict[str, Any], null_draws: int, lab: str) -> None:
    """KEN, its null and p-value (or why there is none)."""
    print(f"novelty (KEN{lab}) = {res['novelty']:.4g}")
    null = res.get("novelty_null")
    if null is not None:
        print(
            f"novelty null: {null['mean']:.4g} +- {null['std']:.2g} over {null['draws']} "
            f"reference splits; p = {res['novelty_p']:.3g} (KEN against {res['m'] - res['n']} "
            "reference samples, the null's size)"
        )
    elif null_draws == 0:
        print("novelty p: off (--null-draws 0)")
    else:
        print(
            f"novelty p: n/a (the null needs a reference of at least 2 n = {2 * res['n']} "
            f"samples; it has {res['m']})"
        )
