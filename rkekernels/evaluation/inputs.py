"""The inputs of the evaluation workbench: image folders or embedding files, and prompts.

- `_Set(path)`: a folder of images (png, jpg, jpeg, webp, bmp; sorted by their path inside the
  folder; hidden entries and report folders left out) or an embedding file (.npy, .npz,
  .pt/.pth, .safetensors; its rows are the samples).
- `_read_prompts(path, gen)`: one prompt per sample of ``gen``: a .txt file (one per line, in
  sorted file order), a .csv matched by file name or in order, or prompt embeddings (n, m).

Bad input raises `rkekernels._errors.CLIError` with one line naming the file.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import warnings
from pathlib import Path

import torch

from .._errors import CLIError
from .._files import as_matrix, load_array

__all__ = ["EMBED_EXTS", "IMAGE_EXTS", "REPORT_MARKER"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: the marker file of a report folder (``rkekernels evaluate --out``); such folders are skipped
REPORT_MARKER = ".rkekernels-report"
EMBED_EXTS = (".npy", ".npz", ".pt", ".pth", ".safetensors")


def _image_files(root: Path) -> list[Path]:
    """The image files under ``root``, leaving out hidden entries (names starting with ".") and
    the folders of reports (`REPORT_MARKER`): a report written inside GEN is not scored."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and not os.path.isfile(os.path.join(dirpath, d, REPORT_MARKER))
        ]
        found += [
            Path(dirpath, f)
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS
        ]
    return found


def _check_image(path: Path, data: bytes) -> None:
    """Check an image file's header (its ``data``) before any encoder loads: Pillow reads it,
    verifies it (PNG chunk checksums) and its size is within ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's
    decompression-bomb warning is an error here), so no image is decoded past that bound.

    Raises:
        CLIError: one line naming the file.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise CLIError(
            f"{path}: too many pixels (over PIL's limit of {Image.MAX_IMAGE_PIXELS:,}, a "
            "possible decompression bomb); resize it or leave it out"
        ) from None
    except Exception as exc:  # any Pillow failure: not an image we can read
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"{path}: cannot read it as an image: {msg}") from None


class _Set:
    """One input set: its items (image paths) or an embedding matrix, and display names.

    ``whole`` is True while ``images`` holds every image file of the folder (what the embedding
    cache may prune to); `subset` gives a slice of them (a torchrun rank's share), never whole.
    """

    def __init__(self, path: str, *, key: str | None = None, max_bytes: int | None = None):
        p = Path(path)
        self.path = p
        self.images: list[Path] | None = None
        self.matrix: torch.Tensor | None = None
        self._found = -1  # how many image files the folder held
        if p.is_dir():
            files = sorted(_image_files(p), key=lambda f: f.relative_to(p).as_posix())
            if not files:
                raise CLIError(
                    f"{p}: no images in this folder (looked for {', '.join(IMAGE_EXTS)})"
                )
            self.images = files
            self._found = len(files)
            self.names = [f.relative_to(p).as_posix() for f in files]
        elif p.suffix.lower() in EMBED_EXTS or p.exists():
            arr = load_array(p, key, max_bytes=max_bytes)
            self.matrix = as_matrix(arr, str(p), flatten=False)
            self.names = list(range(self.matrix.shape[0]))
        else:
            raise CLIError(f"{p}: no such folder or file")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def whole(self) -> bool:
        """Every image file of the folder is in ``images`` (False for an embedding file)."""
        return self.images is not None and len(self.images) == self._found

    def subset(self, idx) -> _Set:
        """The same set restricted to items ``idx`` (in that order): a folder's slice, not
        `whole`; an embedding file's rows.

        Example:
            >>> import numpy as np, tempfile, os
            >>> from rkekernels.evaluation.inputs import _Set
            >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
            >>> np.save(p, np.arange(12.0).reshape(6, 2))
            >>> s = _Set(p).subset(range(1, 6, 2))
            >>> s.names, s.matrix[:, 0].tolist(), s.whole
            ([1, 3, 5], [2.0, 6.0, 10.0], False)
        """
        idx = [int(i) for i in idx]
        out = copy.copy(self)
        out.names = [self.names[i] for i in idx]
        if self.images is not None:
            out.images = [self.images[i] for i in idx]
            out._found = -1  # a slice: the cache never prunes to it
        if self.matrix is not None:
            out.matrix = self.matrix[idx]
        return out


def _read_prompts(path: str, gen: _Set, max_bytes: int | None = None) -> list[str] | torch.Tensor:
    """Prompts for the samples of GEN: a list of strings in GEN's order, or an (n, m) matrix."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{p}: no such prompt file")
    ext = p.suffix.lower()
    n = len(gen)
    if ext in EMBED_EXTS:
        t = as_matrix(load_array(p, max_bytes=max_bytes), str(p), flatten=False)
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
