"""``rkekernels evaluate``: score folders of generated images as researchers do.

    rkekernels evaluate GEN [--reference REF] [--prompts FILE] [--encoder NAME] [--sigma S ...]
                        [--json] [--out DIR]

GEN and REF are folders of images (png, jpg, jpeg, webp, bmp; read with Pillow, sorted by their
path inside the folder) or embedding files (the formats of ``rkekernels score``: .npy, .npz,
.pt/.pth, .safetensors; then "files" are row indices). Images are embedded with the chosen
encoder (`rkekernels.adapters.encoders`, default ``dinov2``); embeddings are cached on disk,
keyed by the encoder and each file's path, size and modification time, so a second run encodes
nothing (it does not even load the model).

``--prompts`` gives one prompt per image: a .txt file (one per line, in sorted file order), a
.csv with a file column (file/filename/image/path) and a prompt column (prompt/caption/text),
matched by file name, a one-column .csv (sorted order), or an embedding file (n, m). Text is
embedded with CLIP's text tower whatever the image encoder is (``--text-model``).

The result (``--json`` prints it as one object) holds n, sigma, encoder, rke (with a jackknife
interval), vendi (order 1, Gaussian at sigma), modes ([{weight, files}]), the most and least
crowded samples (largest / smallest s_i = sum_j k(x_i, x_j)^2); with prompts cond_rke and
cond_vendi; with a reference novelty (KEN), novel_modes and relative_rke. Several ``--sigma``
give lists. ``--out DIR`` writes report.md with a grid of the top modes, the most and least
crowded samples, a bandwidth sweep plot and results.json, into a temporary folder renamed to
DIR at the end: a failure leaves nothing half-written.

Bad input (a folder with no images, an unreadable image, prompts that do not match, an unknown
encoder, weights missing offline) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["IMAGE_EXTS", "add_arguments", "evaluate", "main", "write_report"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EMBED_EXTS = (".npy", ".npz", ".pt", ".pth", ".safetensors")
_CACHE_VERSION = "1"


def _cli_error():
    from .cli import CLIError

    return CLIError


# --------------------------------------------------------------------------- inputs


class _Set:
    """One input set: its items (image paths) or an embedding matrix, and display names."""

    def __init__(self, path: str, *, key: str | None = None):
        CLIError = _cli_error()
        p = Path(path)
        self.path = p
        self.images: list[Path] | None = None
        self.matrix: torch.Tensor | None = None
        if p.is_dir():
            files = sorted(
                (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if not files:
                raise CLIError(
                    f"{p}: no images in this folder (looked for {', '.join(IMAGE_EXTS)})"
                )
            self.images = files
            self.names = [f.relative_to(p).as_posix() for f in files]
        elif p.suffix.lower() in EMBED_EXTS or p.exists():
            from .cli import _as_matrix, load_array

            self.matrix = _as_matrix(load_array(p, key), str(p), flatten=False)
            self.names = list(range(self.matrix.shape[0]))
        else:
            raise CLIError(f"{p}: no such folder or file")

    def __len__(self) -> int:
        return len(self.names)


def _encoder_key(name: str, model: str | None, size: int) -> str:
    """What identifies the features without loading the model: name, weights (and their files)."""
    from .adapters.encoders import DEFAULT_MODELS

    mid = model or DEFAULT_MODELS.get(name, "none")
    stamp = ""
    if model and os.path.isdir(model):
        stamps = [(f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in Path(model).iterdir()]
        stamp = hashlib.sha256(repr(sorted(stamps)).encode()).hexdigest()[:16]
    extra = f"|size={size}" if name == "pixels" else ""
    return f"v{_CACHE_VERSION}|{name}|{os.path.abspath(mid) if stamp else mid}|{stamp}{extra}"


def default_cache_dir() -> Path:
    """$RKEKERNELS_CACHE, else $XDG_CACHE_HOME/rkekernels, else ~/.cache/rkekernels."""
    if os.environ.get("RKEKERNELS_CACHE"):
        return Path(os.environ["RKEKERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rkekernels"


class _Cache:
    """Embeddings on disk: one file per (encoder, folder), {relpath: (mtime_ns, size, vector)}."""

    def __init__(self, root: Path | None, key: str, folder: Path):
        self.file = None
        self.data: dict[str, Any] = {}
        if root is None:
            return
        h = hashlib.sha256(key.encode()).hexdigest()[:24]
        f = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
        self.file = Path(root) / "embeddings" / h / f"{f}.pt"
        if self.file.is_file():
            try:
                self.data = torch.load(self.file, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache is rebuilt, never trusted
                self.data = {}

    @staticmethod
    def stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return int(st.st_mtime_ns), int(st.st_size)

    def get(self, name: str, path: Path) -> torch.Tensor | None:
        hit = self.data.get(name)
        if hit is None or tuple(hit[0].tolist()) != self.stamp(path):
            return None
        return hit[1]

    def put(self, name: str, path: Path, vec: torch.Tensor) -> None:
        self.data[name] = (torch.tensor(self.stamp(path), dtype=torch.int64), vec.clone())

    def save(self) -> None:
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.file.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(self.data, tmp)
            os.replace(tmp, self.file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class _Encoders:
    """Loads the image / text encoders only when something is not in the cache."""

    def __init__(self, opts: dict[str, Any]):
        self.opts = opts
        self._image = None
        self._text = None

    def image(self):
        if self._image is None:
            from .adapters.encoders import load_encoder

            o = self.opts
            self._image = load_encoder(
                o["encoder"],
                model=o["encoder_model"],
                batch_size=o["batch_size"],
                device=o["device"],
                half=o["half"],
                size=o["pixels_size"],
            )
        return self._image

    def text(self):
        if self._text is None:
            from .adapters.encoders import load_text_encoder

            o = self.opts
            img = self._image
            if img is not None and img.text is not None and o["text_model"] is None:
                self._text = img.text
            else:
                model = o["text_model"]
                if model is None and o["encoder"] == "clip":
                    model = o["encoder_model"]
                self._text = load_text_encoder(
                    model, batch_size=o["batch_size"], device=o["device"], half=o["half"]
                )
        return self._text


def _embed_set(s: _Set, enc: _Encoders, cache_root, key: str, progress: bool, stats: dict):
    if s.matrix is not None:
        return s.matrix
    cache = _Cache(cache_root, key, s.path)
    vecs: list[torch.Tensor | None] = [cache.get(n, p) for n, p in zip(s.names, s.images)]
    missing = [i for i, v in enumerate(vecs) if v is None]
    stats["cached"] += len(vecs) - len(missing)
    stats["encoded"] += len(missing)
    if missing:
        feats = enc.image().encode(
            [s.images[i] for i in missing], progress=progress, desc=f"encode {s.path.name}"
        )
        for i, f in zip(missing, feats):
            vecs[i] = f
            cache.put(s.names[i], s.images[i], f)
        cache.save()
    return torch.stack(vecs)


def _read_prompts(path: str, gen: _Set) -> list[str] | torch.Tensor:
    """Prompts for the samples of GEN: a list of strings in GEN's order, or an (n, m) matrix."""
    CLIError = _cli_error()
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{p}: no such prompt file")
    ext = p.suffix.lower()
    n = len(gen)
    if ext in EMBED_EXTS:
        from .cli import _as_matrix, load_array

        t = _as_matrix(load_array(p), str(p), flatten=False)
        if t.shape[0] != n:
            raise CLIError(f"{p}: has {t.shape[0]} prompt embeddings for {n} samples in {gen.path}")
        return t
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"{p}: cannot read it as UTF-8 text: {exc}") from None
    if ext == ".csv":
        rows = list(csv.reader(text.splitlines()))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if not rows:
            raise CLIError(f"{p}: no prompts in this file")
        head = [c.strip().lower() for c in rows[0]]
        fcol = next(
            (head.index(c) for c in ("file", "filename", "image", "path") if c in head), None
        )
        pcol = next((head.index(c) for c in ("prompt", "caption", "text") if c in head), None)
        if fcol is not None and pcol is not None:
            if gen.images is None:
                raise CLIError(
                    f"{p}: matches prompts by file name, but {gen.path} is an embedding file; "
                    "give one prompt per row in order instead"
                )
            by_name: dict[str, str] = {}
            for r in rows[1:]:
                if len(r) <= max(fcol, pcol):
                    continue
                by_name[r[fcol].strip()] = r[pcol]
                by_name.setdefault(Path(r[fcol].strip()).name, r[pcol])
            out = []
            for name in gen.names:
                hit = by_name.get(name, by_name.get(Path(name).name))
                if hit is None:
                    raise CLIError(f"{p}: no prompt for image {name!r} (column {rows[0][fcol]!r})")
                out.append(hit)
            return out
        if len(head) == 1 or pcol is not None:
            col = pcol or 0
            body = rows[1:] if pcol is not None else rows
            lines = [r[col] for r in body if len(r) > col]
        else:
            raise CLIError(
                f"{p}: a CSV needs a file column (file/filename/image/path) and a prompt column "
                "(prompt/caption/text), or a single column of prompts"
            )
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != n:
        raise CLIError(
            f"{p}: has {len(lines)} prompts for {n} samples in {gen.path} "
            "(one prompt per image, in sorted file order)"
        )
    return lines


def _embed_prompts(prompts, enc: _Encoders, cache_root, progress: bool, stats: dict):
    if isinstance(prompts, torch.Tensor):
        return prompts
    o = enc.opts
    model = o["text_model"] or (o["encoder_model"] if o["encoder"] == "clip" else None)
    key = "text|" + _encoder_key("clip", model, 0) + ("|half" if o["half"] else "")
    cache = _Cache(cache_root, key, Path("prompts"))
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in prompts]
    vecs = [cache.data.get(h) for h in hashes]
    missing = sorted({h for h, v in zip(hashes, vecs) if v is None})
    stats["cached_prompts"] = len(prompts) - sum(v is None for v in vecs)
    if missing:
        text_of = dict(zip(hashes, prompts))
        emb = enc.text().encode([text_of[h] for h in missing], progress=progress)
        for h, e in zip(missing, emb):
            cache.data[h] = e.clone()
        cache.save()
    return torch.stack([cache.data[h] for h in hashes])


# --------------------------------------------------------------------------- scores


def _default_sigma(x: torch.Tensor) -> float:
    import rkekernels

    fn = getattr(rkekernels, "default_bandwidth", None) or rkekernels.median_bandwidth
    return float(fn(x))


def _py(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double()
        return float(v) if v.dim() == 0 else [float(a) for a in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _one_or_list(vals: list, many: bool):
    return vals if many else vals[0]


def _modes_json(modes, names, per_mode: int) -> list[dict[str, Any]]:
    return [
        {"weight": float(m.weight), "files": [names[int(i)] for i in m.members[:per_mode]]}
        for m in modes
    ]


def evaluate(
    gen: str,
    reference: str | None = None,
    prompts: str | None = None,
    *,
    encoder: str = "dinov2",
    encoder_model: str | None = None,
    text_model: str | None = None,
    sigma: Sequence[float] | None = None,
    sigma_t: float | None = None,
    top: int = 8,
    per_mode: int = 8,
    crowded: int = 8,
    level: float = 0.95,
    unbiased: bool = False,
    cache_dir: str | os.PathLike | None = "default",
    batch_size: int = 32,
    device: str = "cpu",
    half: bool = False,
    pixels_size: int = 32,
    key: str | None = None,
    progress: bool = False,
    _keep: dict | None = None,
) -> dict[str, Any]:
    """Evaluate a folder of generated images (or an embedding file); the ``--json`` object.

    Scores (Gaussian kernel k_s(a, b) = exp(-||a - b||^2 / (2 s^2)) on the encoder's features)::

        rke          = n^2 / sum_ij k(x_i, x_j)^2, with a jackknife interval (`rke_interval`)
        vendi        = exp(-sum_l p_l log p_l), p = eig(K / n)      (order 1)
        cond_rke     = sum Kt^2 / sum Kx^2 Kt^2, cond_vendi (order 1)       (with prompts)
        relative_rke = n m / sum_ij k(x_i, y_j)^2, novelty = KEN(X | Y)      (with a reference)

    Args:
        gen: folder of images or embedding file. reference: the same, for novelty.
        prompts: prompt file (.txt, .csv) or prompt embeddings, one per GEN sample.
        encoder: "dinov2" (default), "clip", "inception" or "pixels".
        encoder_model: weights (hub id or local folder) for the encoder; None: its default.
        text_model: CLIP weights for the prompts (None: the clip encoder's, else the default).
        sigma: bandwidth(s); None: the default bandwidth of GEN's features. Several give lists.
        sigma_t: prompt bandwidth (None: the default bandwidth of the prompt embeddings).
        top, per_mode: how many modes, and files listed per mode. crowded: how many samples
            in the most / least crowded lists.
        level, unbiased: the interval's coverage and estimator (`rke_interval`).
        cache_dir: embeddings cache ("default": `default_cache_dir`, None: no cache).
        batch_size, device, half, pixels_size: encoder options; the scores run on ``device``
            too (the Triton kernels for CUDA).
        key: array name inside multi-array embedding files.
        progress: tqdm progress bars on stderr.

    Returns:
        A JSON-ready dict (see the module docstring for the keys).

    Raises:
        CLIError: bad input (one line; the command exits with code 2).
    """
    from . import evaluation, vendi
    from .adapters.encoders import EncoderUnavailableError
    from .scores import cond_rke_score, rke_score

    CLIError = _cli_error()
    root = default_cache_dir() if cache_dir == "default" else cache_dir
    opts = dict(
        encoder=encoder,
        encoder_model=encoder_model,
        text_model=text_model,
        batch_size=batch_size,
        device=device,
        half=half,
        pixels_size=pixels_size,
    )
    from .adapters.encoders import ENCODERS

    if encoder not in ENCODERS:
        raise CLIError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    stats = {"cached": 0, "encoded": 0}
    try:
        g = _Set(gen, key=key)
        r = _Set(reference, key=key) if reference is not None else None
        plist = _read_prompts(prompts, g) if prompts is not None else None
        enc = _Encoders(opts)
        # float16 features differ from float32 ones in the last bits: cached apart
        ekey = _encoder_key(encoder, encoder_model, pixels_size) + ("|half" if half else "")
        x = _embed_set(g, enc, root, ekey, progress, stats)
        y = _embed_set(r, enc, root, ekey, progress, stats) if r is not None else None
        t = _embed_prompts(plist, enc, root, progress, stats) if plist is not None else None
    except EncoderUnavailableError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # unreadable images and API checks
        raise CLIError(str(exc).splitlines()[0]) from None
    dev = torch.device(device)  # the scores run where the encoder ran (Triton on CUDA)
    x = x.float().to(dev)
    y = y.to(dev) if y is not None else None
    t = t.to(dev) if t is not None else None
    if y is not None and y.shape[1] != x.shape[1]:
        raise CLIError(
            f"{reference}: features of width {y.shape[1]}, {gen}: width {x.shape[1]}; "
            "embed both sets with the same encoder"
        )
    n = x.shape[0]
    many = sigma is not None and len(sigma) > 1
    sigmas = [float(s) for s in sigma] if sigma else [_default_sigma(x)]
    arg = sigmas if many else sigmas[0]
    s0 = sigmas[0]
    out: dict[str, Any] = {
        "n": n,
        "d": int(x.shape[1]),
        "encoder": encoder if g.matrix is None else "embeddings",
        "encoder_model": (encoder_model or "default") if g.matrix is None else None,
        "sigma": _one_or_list(sigmas, many),
    }
    try:
        with torch.no_grad():
            out["rke"] = _py(rke_score(x, arg))
            enough = n >= (3 if unbiased else 2)  # leave-one-out sets need n - 1 >= 1 (2)
            ci = evaluation.rke_interval(x, arg, level=level, unbiased=unbiased) if enough else None
            out["rke_interval"] = {
                "low": _py(ci.low) if ci else None,
                "high": _py(ci.high) if ci else None,
                "level": level,
                "unbiased": unbiased,
            }
            # the interval's own estimate: the unbiased RKE with --unbiased, else the plug-in RKE
            # from the same float64 sums (rke_score rounds to x's dtype)
            out["rke_interval"]["estimate"] = _py(ci.estimate) if ci else None
            if ci is not None and not unbiased:
                out["rke"] = _py(ci.estimate)
            out["vendi"] = _py(vendi.vendi_score(x, 1.0, arg))
            modes = vendi.vendi_modes(x, min(top, n), s0)
            out["modes"] = _modes_json(modes, g.names, per_mode)
            sums = evaluation.sample_sums(x, sigma=s0).x
            order = torch.argsort(sums, descending=True).tolist()
            k = min(crowded, n)
            out["most_crowded"] = [{"file": g.names[i], "s": float(sums[i])} for i in order[:k]]
            out["least_crowded"] = [
                {"file": g.names[i], "s": float(sums[i])} for i in order[::-1][:k]
            ]
            if t is not None:
                t = t.float()
                st = float(sigma_t) if sigma_t is not None else _default_sigma(t)
                out["sigma_t"] = st
                if enough:
                    cci = evaluation.cond_rke_interval(
                        x, t, arg, st, level=level, unbiased=unbiased
                    )
                    out["cond_rke"] = _py(cci.estimate)
                    out["cond_rke_interval"] = {"low": _py(cci.low), "high": _py(cci.high)}
                else:
                    out["cond_rke"] = _py(cond_rke_score(x, t, arg, st))
                    out["cond_rke_interval"] = {"low": None, "high": None}
                out["cond_vendi"] = _py(vendi.cond_vendi_score(x, t, 1.0, arg, st))
            if y is not None:
                y = y.float()
                out["m"] = int(y.shape[0])
                out["relative_rke"] = _py(evaluation.relative_rke(x, y, arg))
                nov = evaluation.ken_novelty(x, y, s0, top=top, per_mode=per_mode)
                out["novelty"] = nov.score
                out["novel_mass"] = nov.novel_mass
                out["novel_modes"] = _modes_json(nov.modes, g.names, per_mode)
                if many:
                    out["novelty_sigma"] = s0
            if many:
                out["modes_sigma"] = s0
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    out["cache"] = {**stats, "dir": str(root) if root is not None else None}
    if _keep is not None:  # what the report needs beyond the JSON
        _keep.update(x=x, gen=g, sigma=s0, sweep=_sweep(x, s0))
    return out


def _sweep(x: torch.Tensor, s0: float) -> dict[str, list[float]]:
    """RKE (with its interval) and Vendi over 9 bandwidths s0 * 2^(-2 .. 2)."""
    from . import evaluation, vendi

    grid = [s0 * 2.0 ** (k / 2.0) for k in range(-4, 5)]
    if x.shape[0] < 2:  # one sample: RKE = 1 at every bandwidth, no interval
        ones = [1.0] * len(grid)
        return {"sigma": grid, "rke": ones, "low": ones, "high": ones, "vendi": ones}
    ci = evaluation.rke_interval(x, grid)
    return {
        "sigma": grid,
        "rke": [float(v) for v in ci.estimate],
        "low": [float(v) for v in ci.low],
        "high": [float(v) for v in ci.high],
        "vendi": _py(vendi.vendi_score(x, 1.0, grid)),
    }


# --------------------------------------------------------------------------- report


def _grid(rows: list[tuple[str, list[Path]]], path: Path, cols: int) -> None:
    """A figure of thumbnails: one row per (label, images)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from PIL import Image

    nrows = max(1, len(rows))
    fig, axes = plt.subplots(nrows, cols, figsize=(1.3 * cols + 1.2, 1.3 * nrows), squeeze=False)
    for r, (label, files) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(files):
                with Image.open(files[c]) as im:
                    ax.imshow(im.convert("RGB"))
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sweep_plot(sweep: dict, s0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.fill_between(sweep["sigma"], sweep["low"], sweep["high"], alpha=0.25, label="RKE 95% CI")
    ax.plot(sweep["sigma"], sweep["rke"], "o-", label="RKE (order 2)")
    ax.plot(sweep["sigma"], sweep["vendi"], "s--", label="Vendi (order 1)")
    ax.axvline(s0, color="grey", lw=0.8, ls=":", label=f"sigma = {s0:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("bandwidth sigma")
    ax.set_ylabel("effective number of modes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return ", ".join(_fmt(a) for a in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, keep: dict) -> Path:
    """Write report.md, results.json and the figures into ``out_dir``, all or nothing.

    Everything is written to a temporary folder beside ``out_dir``, then renamed to it (an
    existing ``out_dir`` is replaced only once the new report is complete).

    Returns:
        The path of report.md.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a report is an ordinary folder
    try:
        g: _Set = keep["gen"]
        ci = result["rke_interval"]
        lines = [
            "# rkekernels evaluate report",
            "",
            f"- set: `{g.path}` (n = {result['n']}, features d = {result['d']}, "
            f"encoder `{result['encoder']}`)",
            f"- bandwidth sigma = {_fmt(result['sigma'])}",
            f"- **RKE** (order 2) = {_fmt(result['rke'])}, {int(100 * ci['level'])}% interval "
            + (f"of the unbiased estimate {_fmt(ci['estimate'])} " if ci["unbiased"] else "")
            + f"[{_fmt(ci['low'])}; {_fmt(ci['high'])}]",
            f"- **Vendi** (order 1) = {_fmt(result['vendi'])}",
        ]
        if "cond_rke" in result:
            cc = result["cond_rke_interval"]
            lines.append(
                f"- **conditional RKE** = {_fmt(result['cond_rke'])} "
                f"[{_fmt(cc['low'])}; {_fmt(cc['high'])}], conditional Vendi = "
                f"{_fmt(result['cond_vendi'])} (prompt sigma = {_fmt(result['sigma_t'])})"
            )
        if "novelty" in result:
            lines.append(
                f"- **novelty** (KEN) = {_fmt(result['novelty'])} (novel mass "
                f"{_fmt(result['novel_mass'])}), relative RKE = {_fmt(result['relative_rke'])} "
                f"against m = {result['m']} reference samples"
            )
        lines += [
            "",
            "How to read the interval: it is a jackknife interval on log RKE; two generators "
            "whose intervals do not overlap differ by more than sampling noise at this n.",
            "",
        ]
        images = g.images
        if images is not None:
            cols = max(1, min(8, max((len(m["files"]) for m in result["modes"]), default=1)))
            by_name = dict(zip(g.names, images))
            rows = [
                (f"mode {i + 1}\nw={m['weight']:.3f}", [by_name[f] for f in m["files"]])
                for i, m in enumerate(result["modes"])
                if m["files"]
            ]
            _grid(rows, tmp / "modes.png", cols)
            lines += [
                "## Top modes",
                "",
                "Each row: a mode (eigenvector of K/n) with its weight and the samples assigned to "
                "it, most representative first (modes with no assigned sample are left out).",
                "",
                "![top modes](modes.png)",
                "",
            ]
            crowd = [
                ("most\ncrowded", [by_name[c["file"]] for c in result["most_crowded"]]),
                ("least\ncrowded", [by_name[c["file"]] for c in result["least_crowded"]]),
            ]
            _grid(crowd, tmp / "crowded.png", max(1, len(result["most_crowded"])))
            lines += [
                "## Most and least crowded samples",
                "",
                "s_i = sum_j k(x_i, x_j)^2: large in dense modes, 1 for a sample alone.",
                "",
                "![crowded samples](crowded.png)",
                "",
            ]
            if result.get("novel_modes"):
                rows = [
                    (f"novel {i + 1}\nw={m['weight']:.3f}", [by_name[f] for f in m["files"]])
                    for i, m in enumerate(result["novel_modes"])
                    if m["files"]
                ]
                _grid(rows, tmp / "novel_modes.png", cols)
                lines += ["## Novel modes (KEN)", "", "![novel modes](novel_modes.png)", ""]
        else:
            lines += ["(embedding input: modes list row indices, see results.json)", ""]
        _sweep_plot(keep["sweep"], keep["sigma"], tmp / "sweep.png")
        lines += ["## Bandwidth sweep", "", "![bandwidth sweep](sweep.png)", ""]
        lines += ["## Modes", "", "| mode | weight | files |", "| --- | --- | --- |"]
        for i, m in enumerate(result["modes"]):
            files = ", ".join(f"`{f}`" for f in m["files"])
            lines.append(f"| {i + 1} | {m['weight']:.4f} | {files} |")
        body = json.dumps({**result, "sweep": keep["sweep"]}, indent=2)
        lines += ["", "## Results (JSON)", "", "```json", body, "```", ""]
        (tmp / "results.json").write_text(body + "\n")
        (tmp / "report.md").write_text("\n".join(lines))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "report")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.md"


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``rkekernels evaluate``."""
    from .cli import _positive

    a = p.add_argument
    a("gen", metavar="GEN", help="folder of generated images, or an embedding file (n, d)")
    a("--reference", metavar="REF", help="reference images or embeddings (novelty, relative RKE)")
    a("--prompts", metavar="FILE", help="prompts: .txt (one per line), .csv, or embeddings")
    a("--encoder", default="dinov2", help="dinov2 (default), clip, inception or pixels")
    a("--encoder-model", metavar="ID", help="weights: hub id or local folder (default per encoder)")
    a("--text-model", metavar="ID", help="CLIP weights for the prompts (default: CLIP ViT-L/14)")
    a("--sigma", type=_positive, nargs="+", action="extend", metavar="S", help="bandwidth(s)")
    a("--sigma-t", type=_positive, metavar="S", help="bandwidth for the prompt embeddings")
    a("--top", type=int, default=8, help="number of modes reported")
    a("--per-mode", type=int, default=8, help="files listed per mode")
    a("--unbiased", action="store_true", help="unbiased (off-diagonal) interval estimator")
    a("--json", action="store_true", help="print one JSON object")
    a("--out", metavar="DIR", help="write a report (Markdown, figures, JSON) into DIR")
    a("--cache", metavar="DIR", help=f"embedding cache (default: {default_cache_dir()})")
    a("--no-cache", action="store_true", help="do not read or write the embedding cache")
    a("--batch-size", type=int, default=32, help="images per encoder batch")
    a("--device", default="cpu", help="encoder device (cpu, cuda, ...)")
    a("--half", action="store_true", help="run the encoder in float16")
    a("--key", metavar="NAME", help="array name in multi-array embedding files")
    a(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``rkekernels evaluate`` from parsed options; print the result; 0 on success."""
    CLIError = _cli_error()
    for name in ("top", "per_mode", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    cache = None if args.no_cache else (args.cache or "default")
    keep: dict = {}
    res = evaluate(
        args.gen,
        args.reference,
        args.prompts,
        encoder=args.encoder,
        encoder_model=args.encoder_model,
        text_model=args.text_model,
        sigma=args.sigma,
        sigma_t=args.sigma_t,
        top=args.top,
        per_mode=args.per_mode,
        unbiased=args.unbiased,
        cache_dir=cache,
        batch_size=args.batch_size,
        device=args.device,
        half=args.half,
        key=args.key,
        progress=progress,
        _keep=keep if args.out else None,
    )
    if args.out:
        report = write_report(res, args.out, keep)
        print(f"report: {report}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        _print(res)
    return 0


def _print(res: dict[str, Any]) -> None:
    ci = res["rke_interval"]
    print(f"n = {res['n']}  encoder = {res['encoder']}  sigma = {_fmt(res['sigma'])}")
    how = f"unbiased {_fmt(ci['estimate'])} " if ci["unbiased"] else ""
    print(f"RKE   = {_fmt(res['rke'])}  {how}[{_fmt(ci['low'])}; {_fmt(ci['high'])}]")
    print(f"Vendi = {_fmt(res['vendi'])}")
    if "cond_rke" in res:
        print(f"cond RKE = {_fmt(res['cond_rke'])}  cond Vendi = {_fmt(res['cond_vendi'])}")
    if "novelty" in res:
        print(f"novelty (KEN) = {res['novelty']:.4g}  relative RKE = {_fmt(res['relative_rke'])}")
    for i, m in enumerate(res["modes"][:5]):
        files = ", ".join(str(f) for f in m["files"][:4])
        print(f"mode {i + 1}: weight {m['weight']:.3f}  {files}")
    c = res["cache"]
    print(f"embeddings: {c['encoded']} encoded, {c['cached']} from the cache")
