"""The on-disk embedding cache of the evaluation workbench: append-only chunk files.

Layout: ``<root>/embeddings/<h(key)>/<h(folder)>/`` (h: the first 24 hex digits of a sha256;
key: the encoder and its weights, `rkekernels.evaluation.embeddings._encoder_key`) holds chunk
files named ``<time_ns>-<pid>-<random>.pt``, each one torch file::

    {"format": "rkekernels-embeddings", "version": "2", "key": key,
     "digests": [hex, ...] (N distinct), "vectors": (N, D) float32,
     "check": blake2b of the digests and the vectors' bytes}

Row i of ``vectors`` is the embedding of the item whose content hashes to ``digests[i]``
(blake2b of an image file's bytes, sha256 of a prompt). A run reads every chunk of its folder,
appends a chunk every `FLUSH_S` seconds while it encodes (and when it stops, on an error or
Ctrl-C too), so an interrupted run resumes where the last chunk ended. A run that holds every
file of its folder then compacts: one chunk of exactly its entries replaces the chunks it listed
(entries of files no longer in the folder are dropped, as the single file of earlier releases
did); a run on a slice of the folder (a torchrun rank) merges the chunks without dropping any,
only when there are more than `COMPACT_AT`. Each chunk has the format of the single file of
earlier releases, ``<h(folder)>.pt`` beside the folder, which is read as one more chunk and
removed by the next compaction (no re-encoding after an upgrade).

Why it is safe with several writers (the ranks of one torchrun job, two jobs on one folder, a
local or a shared filesystem):

1. A file appears whole or not at all: written to a ``*.tmp`` in the same folder, then renamed
   into place (``os.replace``, atomic); readers list ``*.pt`` only. Names are unique (time, pid,
   48 random bits), so writers never overwrite each other, and files are never modified.
2. A file is removed only by a compaction, after the file that replaces it is in place, and only
   if that file holds every entry of it (or the entry was dropped on purpose: a file that is no
   longer in the folder). So the entries on disk only grow, except by pruning; a reader that
   finds a listed file gone lists the folder again and reads the file that replaced it. Two
   compactions at once both write complete files (duplicates merge by digest); the lock file of
   the merge only spares doing the work twice.
3. A chunk that fails any check on load (unreadable bytes, structure, key, shapes, finite values,
   the width of the others, the checksum) is ignored, never trusted: its entries are encoded
   again and the next compaction removes it. A cache folder that cannot be written is reported
   once (``RuntimeWarning``) and the run goes on without caching.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["COMPACT_AT", "FLUSH_S"]

#: the version inside each chunk (the entries' format, unchanged since the single-file cache)
VERSION = "2"
FORMAT = "rkekernels-embeddings"
#: seconds between two chunks while a run encodes (and one more when it stops)
FLUSH_S = 30.0
#: a chunk is written sooner when its vectors reach this many bytes (bounds the copy)
FLUSH_BYTES = 16 * 2**20
#: a run on a slice of a folder merges its chunks when there are more than this many
COMPACT_AT = 32
#: a merge lock older than this is left over by a process that died
LOCK_STALE_S = 600.0
#: a ``*.tmp`` older than this is left over by a writer that died (removed by compactions)
TMP_STALE_S = 3600.0


def _checksum(digests: list[str], vectors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(digests).encode())
    h.update(memoryview(vectors.contiguous().numpy()).cast("B"))  # no copy of the vectors
    return h.hexdigest()


def _all_finite(v: torch.Tensor) -> bool:
    """No NaN or inf in v, checked in pieces of `FLUSH_BYTES` (isfinite on all of v would hold
    n x D temporaries)."""
    step = max(1, FLUSH_BYTES // (v.element_size() * max(1, v.shape[1])))
    return all(bool(torch.isfinite(piece).all()) for piece in v.split(step))


class _Cache:
    """The chunks of one (encoder key, folder): read them all, append, compact.

    ``index`` maps a digest to (block, row) of ``blocks`` (the vectors of the chunks read);
    ``dim`` is their width D (None when empty). ``want``: keep only these digests in memory (a
    rank's slice holds its share, not the folder's); ``stale`` notes that the chunks hold
    others. ``root`` None: no cache (nothing read or written). See the module docstring for
    the format and why it is safe with several writers.
    """

    def __init__(
        self,
        root: Path | str | None,
        key: str,
        folder: Path,
        stats: dict,
        want: set[str] | None = None,
    ):
        self.key, self.stats = key, stats
        self.dir: Path | None = None
        self.legacy: Path | None = None
        self.blocks: list[torch.Tensor] = []
        self.index: dict[str, tuple[int, int]] = {}
        self.dim: int | None = None
        self.read_names: list[str] = []  # the chunks read, valid or damaged (a merge removes them)
        self.damaged = 0
        self.want = want
        self.stale = False  # the chunks hold entries not in ``want``
        self.unordered = False  # the set's rows are not one chunk in order (see `take`)
        if root is None:
            return
        h = hashlib.sha256(key.encode()).hexdigest()[:24]
        f = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
        self.dir = Path(root) / "embeddings" / h / f
        self._read()

    # ------------------------------------------------------------------ reading

    def _names(self) -> list[str]:
        """The chunk files now in the folder, newest first."""
        try:
            with os.scandir(self.dir) as it:
                return sorted((e.name for e in it if e.name.endswith(".pt")), reverse=True)
        except OSError:  # no folder yet (or not a folder): no chunks
            return []

    def _read(self) -> None:
        done: set[str] = set()
        for _ in range(16):  # a file gone between listing and reading: a compaction replaced it
            gone = False
            for name in self._names():
                if name not in done:
                    done.add(name)
                    got = self._load(self.dir / name)
                    gone |= got == "gone"
                    if got in ("ok", "bad"):
                        self.read_names.append(name)
            if not gone:
                break
        legacy = self.dir.with_suffix(".pt")  # the single file of earlier releases
        if legacy.is_file() and self._load(legacy) in ("ok", "bad"):
            self.legacy = legacy

    def _load(self, path: Path) -> str:
        """Add one chunk: "ok", "bad" (damaged: ignored), "gone" (removed meanwhile), "skip"."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return "gone"
        except OSError:  # unreadable now (permissions, I/O): ignored, but not removed
            return "skip"
        except Exception:  # not a torch file, or not only tensors and plain data
            obj = None
        try:
            got = self._checked(obj)
        except Exception:  # e.g. a dtype numpy cannot view
            got = None
        if got is None:
            self.damaged += 1
            return "bad"
        digests, vectors = got
        if self.want is not None:
            rows = [i for i, d in enumerate(digests) if d in self.want]
            if len(rows) < len(digests):
                self.stale = True
                if not rows:
                    return "ok"
                digests, vectors = [digests[i] for i in rows], vectors[rows]
        b = len(self.blocks)
        self.blocks.append(vectors)
        self.dim = vectors.shape[1]
        for i, d in enumerate(digests):
            self.index.setdefault(d, (b, i))
        return "ok"

    def _checked(self, obj: Any) -> tuple[list[str], torch.Tensor] | None:
        """(digests, vectors) of a loaded chunk, or None unless every check passes."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            return None
        if obj.get("version") != VERSION or obj.get("key") != self.key:
            return None
        digests, vectors = obj.get("digests"), obj.get("vectors")
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            return None
        if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[1] < 1:
            return None
        if not vectors.is_floating_point() or vectors.shape[0] != len(set(digests)):
            return None
        if len(digests) != len(set(digests)):
            return None
        if not _all_finite(vectors):
            return None
        if self.dim is not None and vectors.shape[1] != self.dim:  # the width of the others
            return None
        if obj.get("check") != _checksum(digests, vectors):
            return None
        return digests, vectors

    def has(self, digest: str) -> bool:
        return digest in self.index

    def get(self, digest: str) -> torch.Tensor | None:
        hit = self.index.get(digest)
        return None if hit is None else self.blocks[hit[0]][hit[1]]

    def fill(self, out: torch.Tensor, rows: list[int], digests: list[str]) -> None:
        """``out[r] = `` the cached vector of ``digests[r]`` for each r in ``rows`` (one
        gather per chunk, in pieces of `FLUSH_BYTES`)."""
        by: dict[int, tuple[list[int], list[int]]] = {}
        for r in rows:
            b, i = self.index[digests[r]]
            rs, ix = by.setdefault(b, ([], []))
            rs.append(r)
            ix.append(i)
        step = max(1, FLUSH_BYTES // (4 * max(1, out.shape[1])))  # bounded temporaries
        for b, (rs, ix) in by.items():
            for k in range(0, len(rs), step):
                sel = torch.tensor(ix[k : k + step])
                out[torch.tensor(rs[k : k + step])] = self.blocks[b][sel].to(out.dtype)

    def take(self, digests: list[str]) -> torch.Tensor | None:
        """The vectors of ``digests`` without a copy when one chunk holds exactly them, in this
        order (a compacted folder read again), else None. `unordered` notes that the chunk
        files are not the one a compaction writes (the distinct digests in order)."""
        uniq = list(dict.fromkeys(digests))
        self.unordered = True
        if len(self.blocks) != 1 or len(self.index) != len(uniq):
            return None
        block = self.blocks[0]
        if block.shape[0] != len(uniq) or block.dtype != torch.float32:
            return None
        if any(self.index.get(d) != (0, i) for i, d in enumerate(uniq)):
            return None
        self.unordered = False
        return block if len(uniq) == len(digests) else None

    def release(self) -> None:
        """Forget what was read (the memory of the vectors); `has` is False from now on."""
        self.blocks, self.index = [], {}

    # ------------------------------------------------------------------ writing

    def append(self, digests: list[str], vectors: torch.Tensor) -> str | None:
        """Write one chunk of (digest, vector) entries (the first of a repeated digest kept);
        returns its file name, or None (no cache, or it cannot be written)."""
        if self.dir is None or self.stats.get("_cache_off") or not digests:
            return None
        first = dict(zip(reversed(digests), range(len(digests) - 1, -1, -1)))
        if len(first) < len(digests):
            rows = sorted(first.values())
            digests, vectors = [digests[r] for r in rows], vectors[rows]
        vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key,
            "digests": list(digests),
            "vectors": vectors,
            "check": _checksum(list(digests), vectors),
        }
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.pt"
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            os.close(fd)
            torch.save(obj, tmp)
            os.replace(tmp, self.dir / name)
            return name
        except OSError as exc:
            self.stats["_cache_off"] = True
            warnings.warn(
                f"cannot write the embedding cache under {self.dir.parents[2]} "
                f"({exc.strerror or exc}); going on without caching (--cache DIR, --no-cache)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def compact(self, digests: list[str], vectors: torch.Tensor, force: bool = False) -> None:
        """A run that holds every file of the folder: one chunk of exactly these entries
        (``vectors[r]`` for ``digests[r]``) replaces every chunk listed now, when ``force`` (some
        entries are not written yet) or there is more than one chunk, or the legacy file, or a
        damaged chunk, or entries of files no longer in the folder."""
        if self.dir is None or self.stats.get("_cache_off"):
            return
        names = self._names()
        tidy = len(names) > 1 or self.legacy is not None or self.stale or self.damaged
        tidy = tidy or self.unordered
        if not force and not tidy:
            return
        if not force and not self._writable():  # a read-only shared cache: read, not tidied
            return
        if self.append(digests, vectors) is not None:
            self._remove(names, self.legacy)

    def merge(self, force: bool = False) -> None:
        """A run on a slice of the folder: when more than `COMPACT_AT` chunks (or ``force``),
        one chunk of every valid entry on disk now replaces the chunks it was read from; under a
        lock file (another process merging: nothing to do)."""
        if self.dir is None or self.stats.get("_cache_off"):
            return
        if not force and len(self._names()) <= COMPACT_AT and self.legacy is None:
            return
        if not self._lock():
            return
        try:
            now = _Cache(None, self.key, Path(), self.stats)
            now.dir = self.dir
            now._read()
            digests = list(now.index)
            if not digests:
                return
            out = torch.empty(len(digests), now.dim, dtype=torch.float32)
            now.fill(out, list(range(len(digests))), digests)
            now.release()
            if self.append(digests, out) is not None:
                self._remove(now.read_names, now.legacy)
        finally:
            (self.dir / "compact.lock").unlink(missing_ok=True)

    def _remove(self, names: list[str], legacy: Path | None) -> None:
        """Remove chunks whose entries are in a chunk written since (or dropped on purpose)."""
        for path in [self.dir / n for n in names] + ([legacy] if legacy is not None else []):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a folder we may add to but not remove from: left as it is
                pass
        try:  # temporary files of writers that died
            for e in os.scandir(self.dir):
                if e.name.endswith(".tmp") and time.time() - e.stat().st_mtime > TMP_STALE_S:
                    os.unlink(e.path)
        except OSError:
            pass

    def _writable(self) -> bool:
        d = self.dir
        while not d.exists() and d != d.parent:
            d = d.parent
        return os.access(d, os.W_OK)

    def _lock(self) -> bool:
        lock = self.dir / "compact.lock"
        for _ in range(2):
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime < LOCK_STALE_S:
                        return False
                    lock.unlink(missing_ok=True)  # left by a merge that died
                except OSError:
                    pass
            except OSError:
                return False
        return False
