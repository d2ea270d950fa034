"""Embeddings for the evaluation workbench: the on-disk cache and the encoders, loaded on demand.

Images are embedded with an encoder of `rkekernels.adapters.encoders`; the features are cached
on disk (`default_cache_dir`), one file per (encoder, folder), keyed by each file's path, size
and modification time, so a second run encodes nothing and does not even load the model.
Prompts are embedded with CLIP's text tower and cached by the hash of their text.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..adapters import encoders
from .inputs import _Set

__all__ = ["default_cache_dir"]

_CACHE_VERSION = "1"


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
            o = self.opts
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
                self._text = encoders.load_text_encoder(
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
