"""Embeddings for the evaluation workbench: the on-disk cache and the encoders, loaded on demand.

Images are embedded with an encoder of `rkekernels.adapters.encoders`; the features are cached
on disk (`default_cache_dir`), one file per (encoder, folder), keyed by the content of each file
(blake2b of its bytes: about 80 ms per 1,000 small PNGs), so a second run encodes nothing and does
not even load the model, and a different image with the same name, size and time is re-encoded.
Prompts are embedded with CLIP's text tower and cached by the hash of their text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import tempfile
import threading
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import torch

from .._errors import CLIError
from ..adapters import encoders
from .inputs import _check_image

__all__ = ["default_cache_dir"]

_CACHE_VERSION = "2"


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
    """Embeddings on disk: one file per (encoder, folder), keyed by the content of each item.

    The file holds {"format", "version", "key", "digests": [hex, ...], "vectors": (N, D),
    "check"}: row i of ``vectors`` is the embedding of the item whose content hashes to
    ``digests[i]`` (blake2b of an image file's bytes, sha256 of a prompt), so a different image
    under the same name, size and modification time is never served the old vector. A file that
    does not pass every check on load (structure, the key, shapes, finite values, the checksum
    ``check`` over digests and vectors) is rebuilt, never trusted. A cache folder that cannot be
    written is reported once (``RuntimeWarning``) and the run goes on without caching.
    """

    FORMAT = "rkekernels-embeddings"

    def __init__(self, root: Path | None, key: str, folder: Path, stats: dict):
        self.file = None
        self.key = key
        self.stats = stats
        self.data: dict[str, torch.Tensor] = {}
        if root is None:
            return
        h = hashlib.sha256(key.encode()).hexdigest()[:24]
        f = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
        self.file = Path(root) / "embeddings" / h / f"{f}.pt"
        try:
            if self.file.is_file():
                self.data = self._checked(
                    torch.load(self.file, map_location="cpu", weights_only=True)
                )
        except Exception:  # unreadable or damaged: rebuilt, never trusted
            self.data = {}

    @staticmethod
    def _checksum(digests: list[str], vectors: torch.Tensor) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update("\n".join(digests).encode())
        h.update(vectors.contiguous().numpy().tobytes())
        return h.hexdigest()

    def _checked(self, obj: Any) -> dict[str, torch.Tensor]:
        """The {digest: vector} of a loaded file, or {} unless every check passes."""
        if not isinstance(obj, dict) or obj.get("format") != self.FORMAT:
            return {}
        if obj.get("version") != _CACHE_VERSION or obj.get("key") != self.key:
            return {}
        digests, vectors = obj.get("digests"), obj.get("vectors")
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            return {}
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] < 1:
            return {}
        if not vectors.is_floating_point() or vectors.shape[0] != len(set(digests)):
            return {}
        if len(digests) != len(set(digests)) or not bool(torch.isfinite(vectors).all()):
            return {}
        if obj.get("check") != self._checksum(digests, vectors):
            return {}
        return dict(zip(digests, vectors.unbind(0)))

    def get(self, digest: str) -> torch.Tensor | None:
        return self.data.get(digest)

    def put(self, digest: str, vec: torch.Tensor) -> None:
        self.data[digest] = vec.detach().cpu().clone()

    def save(self, keep: list[str] | None = None) -> None:
        """Write the cache (only the entries in ``keep`` when given), atomically; a folder that
        cannot be written: one warning per run, then no more attempts."""
        if self.file is None or self.stats.get("_cache_off"):
            return
        digests = list(dict.fromkeys(keep)) if keep is not None else list(self.data)
        digests = [d for d in digests if d in self.data]
        if not digests or len({self.data[d].shape for d in digests}) != 1:
            return
        vectors = torch.stack([self.data[d] for d in digests])
        obj = {
            "format": self.FORMAT,
            "version": _CACHE_VERSION,
            "key": self.key,
            "digests": digests,
            "vectors": vectors,
            "check": self._checksum(digests, vectors),
        }
        tmp = None
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, suffix=".tmp")
            os.close(fd)
            torch.save(obj, tmp)
            os.replace(tmp, self.file)
        except OSError as exc:
            self.stats["_cache_off"] = True
            warnings.warn(
                f"cannot write the embedding cache under {self.file.parents[2]} "
                f"({exc.strerror or exc}); going on without caching (--cache DIR, --no-cache)",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


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


def _embed_sets(sets, enc: _Encoders, cache_root, key: str, progress: bool, stats: dict):
    """The features of each set (an embedding file's matrix, or its images embedded).

    First, for every set: hash each image file (blake2b of its bytes), look it up in the cache,
    and check the images that are not there (`_check_image`: readable header, size within PIL's
    pixel limit); only then is the encoder loaded, and only if something is missing.
    """
    plans = []
    for s in sets:
        if s is None or s.matrix is not None:
            plans.append(None)
            continue
        cache = _Cache(cache_root, key, s.path, stats)
        digests, missing = [], []
        for i, path in enumerate(s.images):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CLIError(f"{path}: cannot read it: {exc.strerror or exc}") from None
            digests.append(_file_digest(data))
            if cache.get(digests[-1]) is None:
                _check_image(path, data)
                missing.append(i)
        plans.append((cache, digests, missing))
    out = []
    for s, plan in zip(sets, plans):
        if s is None or plan is None:
            out.append(None if s is None else s.matrix)
            continue
        cache, digests, missing = plan
        stats["cached"] += len(digests) - len(missing)
        stats["encoded"] += len(missing)
        if missing:
            _encode_into(cache, s, digests, missing, enc, progress)
            vecs = [cache.get(d) for d in digests]
            if len({v.shape for v in vecs}) != 1:  # cached for other features: encode all
                stats["cached"] -= len(digests) - len(missing)
                stats["encoded"] += len(digests) - len(missing)
                cache.data = {}
                _encode_into(cache, s, digests, range(len(digests)), enc, progress)
            cache.save(keep=digests)
        vecs = [cache.get(d) for d in digests]
        out.append(torch.stack(vecs))
    return out


def _encode_into(cache: _Cache, s, digests, idx, enc: _Encoders, progress: bool) -> None:
    idx = list(idx)
    feats = enc.image().encode(
        [s.images[i] for i in idx], progress=progress, desc=f"encode {s.path.name}"
    )
    for i, f in zip(idx, feats):
        cache.put(digests[i], f)


def _embed_prompts(prompts, enc: _Encoders, cache_root, progress: bool, stats: dict):
    if isinstance(prompts, torch.Tensor):
        return prompts
    o = enc.opts
    model = o["text_model"] or (o["encoder_model"] if o["encoder"] == "clip" else None)
    key = "text|" + _encoder_key("clip", model, 0) + ("|half" if o["half"] else "")
    cache = _Cache(cache_root, key, Path("prompts"), stats)
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in prompts]
    missing = sorted({h for h in hashes if cache.get(h) is None})
    stats["cached_prompts"] = sum(cache.get(h) is not None for h in hashes)
    if missing:
        text_of = dict(zip(hashes, prompts))
        emb = enc.text().encode([text_of[h] for h in missing], progress=progress)
        for h, e in zip(missing, emb):
            cache.put(h, e)
        if len({cache.get(h).shape for h in hashes}) != 1:  # cached for another model
            missing = sorted(set(hashes))
            emb = enc.text().encode([text_of[h] for h in missing], progress=progress)
            cache.data = {}
            for h, e in zip(missing, emb):
                cache.put(h, e)
        cache.save()
    return torch.stack([cache.get(h) for h in hashes])
