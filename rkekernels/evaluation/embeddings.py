"""Embeddings for the evaluation workbench: the on-disk cache and the encoders, loaded on demand.

Images are embedded with an encoder of `rkekernels.adapters.encoders`; the features are cached
on disk (`default_cache_dir`), one file per (encoder, folder), keyed by the content of each file
(blake2b of its bytes: about 80 ms per 1,000 small PNGs), so a second run encodes nothing and does
not even load the model, and a different image with the same name, size and time is re-encoded.
Prompts are embedded with CLIP's text tower and cached by the hash of their text.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import CLIError
from ..adapters import _images, encoders
from . import cache
from .inputs import _check_image

__all__ = ["DECODE_WORKERS", "decode_workers", "default_cache_dir"]

_CACHE_VERSION = "2"
#: decoding processes by default (measured: see docs/performance.md)
DECODE_WORKERS = 0
#: files per task of the hashing and checking passes
HASH_BATCH = 256


def _encoder_key(name: str, model: str | None, size: int) -> str:
    """What identifies the features without loading the model: name, weights (and their files)."""
    mid = model or encoders.DEFAULT_MODELS.get(name, "none")
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


#: the hint for a missing package, for an installed package and a source checkout alike
INSTALL_HINT = (
    "pip install 'rkekernels[encoders]' (in a source checkout: pip install -e '.[encoders]')"
)
HUB_TIMEOUT_S = 3.0  # the one connection attempt to the hub, when the weights are not cached


def _hub_reachable(timeout: float | None = None) -> bool:
    """One TCP connection to the Hugging Face endpoint ($HF_ENDPOINT), name lookup included,
    bounded by ``timeout`` seconds (None: `HUB_TIMEOUT_S`); no retries."""
    timeout = HUB_TIMEOUT_S if timeout is None else timeout
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)  # the name lookup has no timeout
    t.start()
    t.join(timeout)
    return bool(ok)


def _check_weights(name: str, model: Any) -> None:
    """Before transformers is imported: say in one line why a hub encoder cannot load here.

    For "clip" / "dinov2" with hub weights (not a local folder): transformers must be installed,
    and the weights must be in the Hugging Face cache (``huggingface_hub.try_to_load_from_cache``)
    or, unless HF_HUB_OFFLINE is set, the hub must answer one connection attempt within
    `HUB_TIMEOUT_S` seconds. Otherwise `EncoderUnavailableError` names ``--encoder pixels``
    (which needs no weights).
    """
    if name not in ("clip", "dinov2") or (model is not None and not isinstance(model, str)):
        return
    if model is not None and os.path.isdir(model):
        return
    if importlib.util.find_spec("transformers") is None:
        raise encoders.EncoderUnavailableError(
            f"encoder {name!r} needs transformers: {INSTALL_HINT}; or use --encoder pixels "
            "(no weights needed)"
        )
    mid = model or encoders.DEFAULT_MODELS[name]
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    if isinstance(try_to_load_from_cache(mid, "config.json"), str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if not offline and _hub_reachable():
        return  # not cached, but the hub answers: transformers downloads them
    why = "offline (HF_HUB_OFFLINE)" if offline else "the hub is not reachable"
    raise encoders.EncoderUnavailableError(
        f"no weights for encoder {name!r} ({mid!r}) in the Hugging Face cache and {why}; "
        f"download them once with network access (`hf download {mid}`), pass a local folder "
        "with --encoder-model, or use --encoder pixels (works offline)"
    )


class _Encoders:
    """Loads the image / text encoders only when something is not in the cache."""

    def __init__(self, opts: dict[str, Any]):
        self.opts = opts
        self._image = None
        self._text = None

    def image(self):
        if self._image is None:
            o = self.opts
            _check_weights(o["encoder"], o["encoder_model"])
            self._image = encoders.load_encoder(
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
            o = self.opts
            img = self._image
            if img is not None and img.text is not None and o["text_model"] is None:
                self._text = img.text
            else:
                model = o["text_model"]
                if model is None and o["encoder"] == "clip":
                    model = o["encoder_model"]
                _check_weights("clip", model)
                self._text = encoders.load_text_encoder(
                    model, batch_size=o["batch_size"], device=o["device"], half=o["half"]
                )
        return self._text


def _file_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _hash_file(path: Path) -> str:
    """blake2b of a file's bytes (module level: runs in the decoding workers)."""
    return _file_digest(_read(path))


def _check_file(path: Path) -> None:
    _check_image(path, _read(path))


def _read_decode(path: Path) -> tuple[str, np.ndarray]:
    """One file read once: the digest of its bytes and its (H, W, 3) uint8 pixels."""
    data = _read(path)
    return _file_digest(data), _images.decode_rgb(data, path)


def decode_workers() -> int:
    """Processes that read, hash and decode image files: $RKEKERNELS_DECODE_WORKERS, else
    `DECODE_WORKERS` (0: in the main process)."""
    env = os.environ.get("RKEKERNELS_DECODE_WORKERS", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise CLIError(
                f"RKEKERNELS_DECODE_WORKERS must be an integer >= 0; got {env!r}"
            ) from None
    return DECODE_WORKERS


def _each(fn, paths: list[Path], workers: int, bar=None) -> list:
    """fn over paths in batches of `HASH_BATCH` (in the workers), in order, counting on bar."""
    bar = bar or encoders._bar(0, False, "")
    out: list = []
    with contextlib.closing(
        _images.map_batches(fn, paths, batch=HASH_BATCH, workers=workers)
    ) as it:
        for _, got in it:
            out += got
            bar.update(len(got))
    bar.close()
    return out


def _embed_sets(
    sets,
    enc: _Encoders,
    cache_root,
    key: str,
    progress: bool,
    stats: dict,
    *,
    workers: int | None = None,
    flush_s: float | None = None,
):
    """The features of each set (an embedding file's matrix, or its images embedded).

    First, for every set: hash each image file (blake2b of its bytes), look it up in the cache
    (`rkekernels.evaluation.cache`), and check the images that are not there (`_check_image`:
    readable header, size within PIL's pixel limit); only then is the encoder loaded, and only
    if something is missing. Then the missing images are read, decoded and encoded a batch at a
    time (each distinct image once), a chunk of the cache written every ``flush_s`` seconds and
    when encoding stops (an error or Ctrl-C included), so an interrupted run resumes; memory
    holds the (n, D) features and a few batches of images, not n images.

    Args:
        sets: `_Set` objects (or None); a folder's slice (`_Set.subset`, a torchrun rank's
            share) is cached like a whole folder, but never prunes the cache.
        enc, cache_root, key: the encoders, the cache folder (None: no cache), the encoder key.
        progress: tqdm bars on stderr (hashing, then encoding, in images per second).
        stats: {"cached", "encoded"} counts of files, updated.
        workers: decoding processes (None: `decode_workers`).
        flush_s: seconds between two chunks (None: `rkekernels.evaluation.cache.FLUSH_S`).

    Returns:
        For each set: None, its (n, d) matrix, or its (n, D) float32 features in file order.
    """
    workers = decode_workers() if workers is None else max(0, int(workers))
    flush_s = cache.FLUSH_S if flush_s is None else float(flush_s)
    plans = [_plan(s, cache_root, key, stats, progress, workers) for s in sets]
    out = []
    for s, plan in zip(sets, plans):
        if plan is None:
            out.append(None if s is None else s.matrix)
        else:
            out.append(_features(s, *plan, enc, progress, workers, flush_s, stats))
    return out


def _plan(s, cache_root, key: str, stats: dict, progress: bool, workers: int):
    """(cache, digests, missing rows) of a folder: every file hashed, the missing ones checked."""
    if s is None or s.matrix is not None:
        return None
    bar = encoders._bar(len(s.images), progress, f"hash {s.path.name}")
    digests = _each(_hash_file, s.images, workers, bar)
    c = cache._Cache(cache_root, key, s.path, stats, want=set(digests))
    missing = [i for i, d in enumerate(digests) if not c.has(d)]
    _each(_check_file, [s.images[i] for i in missing], workers)
    return c, digests, missing


def _features(s, c, digests, missing, enc: _Encoders, progress, workers, flush_s, stats):
    """The (n, D) features of a folder: cached rows gathered, missing ones encoded; then the
    cache compacted (a whole folder) or merged when it holds many chunks (a slice)."""
    n = len(digests)
    stats["cached"] += n - len(missing)
    stats["encoded"] += len(missing)
    e = enc.image() if missing else None
    if e is not None and c.dim not in (None, e.dim):  # cached for other features: encode all
        stats["cached"] -= n - len(missing)
        stats["encoded"] += n - len(missing)
        missing = list(range(n))
        c.damaged += 1  # the old chunks go at the next compaction
        c.release()
    out = c.take(digests) if not missing else None
    if out is None:
        out = torch.empty(n, e.dim if e is not None else c.dim, dtype=torch.float32)
        todo = set(missing)
        c.fill(out, [i for i in range(n) if i not in todo], digests)
    c.release()
    rest: list[int] = []
    if missing:
        rest = _encode_into(c, s, digests, missing, e, out, progress, workers, flush_s)
    if s.whole:  # its compaction writes the last rows too
        c.compact(digests, out, force=bool(rest))
    else:
        c.append([digests[r] for r in rest], out[rest])
        c.merge()
    return out


def _encode_into(c, s, digests, idx, e, out, progress, workers, flush_s) -> list[int]:
    """Encode the images of rows ``idx`` into ``out`` (each distinct digest once), appending a
    chunk to the cache every ``flush_s`` seconds (or `cache.FLUSH_BYTES`) and on an error or
    Ctrl-C; returns the rows encoded since the last chunk (for the caller to write)."""
    first: dict[str, int] = {}
    for i in idx:
        first.setdefault(digests[i], i)
    uniq = list(first.values())
    copies = [(i, first[digests[i]]) for i in idx if first[digests[i]] != i]
    bar = encoders._bar(len(uniq), progress, f"encode {s.path.name} ({e.name})")
    pending: list[int] = []
    last, done = time.monotonic(), False
    rows_max = max(1, cache.FLUSH_BYTES // (4 * out.shape[1]))
    paths = [s.images[i] for i in uniq]
    try:
        with contextlib.closing(
            _images.map_batches(_read_decode, paths, batch=e.batch_size, workers=workers)
        ) as it:
            for start, got in it:
                rows = uniq[start : start + len(got)]
                out[rows] = e.encode([_images.rgb_chw(a) for _, a in got])
                for r, (d, _) in zip(rows, got):
                    digests[r] = d  # changed since it was hashed: keyed by the bytes encoded
                pending += rows
                bar.update(len(rows))
                if time.monotonic() - last >= flush_s or len(pending) >= rows_max:
                    c.append([digests[r] for r in pending], out[pending])
                    pending, last = [], time.monotonic()
        done = True
    finally:
        if pending and not done:  # stopped early: keep what was encoded
            c.append([digests[r] for r in pending], out[pending])
        bar.close()
    for i, j in copies:
        out[i], digests[i] = out[j], digests[j]
    return pending


def _rows(emb) -> torch.Tensor:
    """A text encoder's output, (n, D) or n vectors, as an (n, D) float32 tensor."""
    if isinstance(emb, torch.Tensor):
        return emb.float()
    return torch.stack([torch.as_tensor(e, dtype=torch.float32) for e in emb])


def _embed_prompts(prompts, enc: _Encoders, cache_root, progress: bool, stats: dict):
    if isinstance(prompts, torch.Tensor):
        return prompts
    o = enc.opts
    model = o["text_model"] or (o["encoder_model"] if o["encoder"] == "clip" else None)
    key = "text|" + _encoder_key("clip", model, 0) + ("|half" if o["half"] else "")
    c = cache._Cache(cache_root, key, Path("prompts"), stats)
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in prompts]
    missing = sorted({h for h in hashes if not c.has(h)})
    stats["cached_prompts"] = sum(c.has(h) for h in hashes)
    text_of = dict(zip(hashes, prompts))
    emb = None
    if missing:
        emb = _rows(enc.text().encode([text_of[h] for h in missing], progress=progress))
        if c.dim not in (None, emb.shape[1]):  # cached for another model: encode all
            missing = sorted(set(hashes))
            emb = _rows(enc.text().encode([text_of[h] for h in missing], progress=progress))
            c.damaged += 1
            c.release()
        c.append(missing, emb)
    out = torch.empty(len(hashes), emb.shape[1] if emb is not None else c.dim)
    new = {h: r for r, h in enumerate(missing)}
    c.fill(out, [i for i, h in enumerate(hashes) if h not in new], hashes)
    for i, h in enumerate(hashes):
        if h in new:
            out[i] = emb[new[h]]
    c.release()
    c.merge()
    return out
