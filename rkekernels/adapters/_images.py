"""Images in, and the differentiable resize / crop / normalise of the image encoders.

`load_image` (a file to a (3, H, W) float tensor in [0, 1]), `_as_chw` (any supported image item
to (3, H, W)), `decode_rgb` / `rgb_chw` (bytes to an (H, W, 3) uint8 array, and that to the
(3, H, W) tensor of `load_image`), `map_batches` (a function over files, batch by batch, in
decoding worker processes, with a bounded number of batches in flight) and `_Transform` (the
encoders' preprocessing on a (b, 3, H, W) batch, with gradients). Used by
`rkekernels.adapters.encoders`, which re-exports `load_image`.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- images in


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read one image file (png, jpg, webp, ... via Pillow) as a (3, H, W) float32 tensor in [0, 1].

    Grey, palette and RGBA images are converted to RGB. A file Pillow cannot decode raises
    ValueError naming the file.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from PIL import Image
        >>> from rkekernels.adapters.encoders import load_image
        >>> p = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(p)
        >>> tuple(load_image(p).shape)
        (3, 5, 7)
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from None
    return rgb_chw(decode_rgb(data, path))


def decode_rgb(data: bytes, name: str | os.PathLike = "<bytes>") -> np.ndarray:
    """An image file's bytes -> (H, W, 3) uint8 RGB array (what `load_image` decodes).

    Raises ValueError naming ``name`` when Pillow cannot decode it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im.convert("RGB"), dtype=np.uint8)  # writable, for torch
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {os.fspath(name)!r}: {exc}") from None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read and decode one image file: (H, W, 3) uint8 (module level: picklable for workers)."""
    with open(path, "rb") as f:
        return decode_rgb(f.read(), path)


def rgb_chw(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], bit for bit as `load_image`."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def _apply(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in items]


def map_batches(
    fn: Callable[[Any], Any], items: Sequence[Any], *, batch: int, workers: int = 0
) -> Iterator[tuple[int, list[Any]]]:
    """``fn`` over ``items`` batch by batch, in order: yields (start, [fn(x) for x in batch]).

    With ``workers`` > 0 the batches run in a pool of that many processes (``fn`` must be a
    module-level function); at most 2 * workers batches are in flight, so memory is bounded by
    the batch size, not by len(items). An error in ``fn`` is raised here, in order; the batches
    still in flight are cancelled.

    Example:
        >>> from rkekernels.adapters._images import map_batches
        >>> [(s, r) for s, r in map_batches(abs, [-1, 2, -3], batch=2)]
        [(0, [1, 2]), (2, [3])]
    """
    batch = max(1, int(batch))
    starts = iter(range(0, len(items), batch))
    if workers <= 0:
        for s in starts:
            yield s, _apply(fn, items[s : s + batch])
        return
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=int(workers))
    ahead: deque = deque()
    try:
        for s in starts:
            ahead.append((s, pool.submit(_apply, fn, items[s : s + batch])))
            if len(ahead) >= 2 * workers:
                break
        while ahead:
            s, fut = ahead.popleft()
            nxt = next(starts, None)
            if nxt is not None:
                ahead.append((nxt, pool.submit(_apply, fn, items[nxt : nxt + batch])))
            yield s, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _as_chw(item: Any) -> torch.Tensor:
    """One image of any accepted kind -> (3, H, W) float32 in [0, 1]."""
    if isinstance(item, str | os.PathLike):
        return load_image(item)
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        arr = np.asarray(item.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    t = torch.as_tensor(np.asarray(item)) if not isinstance(item, torch.Tensor) else item
    if t.dim() != 3:
        raise ValueError(f"an image must be (3, H, W) or (H, W, 3); got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    t = t.float()
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t


# --------------------------------------------------------------------------- transforms


def _resize_short(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    s = size / min(h, w)
    shape = (max(size, int(h * s)), max(size, int(w * s)))  # floor, as transformers does
    return F.interpolate(x, size=shape, mode=mode, align_corners=False, antialias=True)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


class _Transform:
    """The published pre-processing, as differentiable torch ops on (b, 3, H, W) in [0, 1]."""

    def __init__(self, *, resize: int, crop: int | None, mode: str, mean, std):
        self.resize, self.crop, self.mode = resize, crop, mode
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) if mean is not None else None
        self.std = torch.tensor(std).view(1, 3, 1, 1) if std is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.geometry(x))

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (and crop) to the model's input size."""
        if self.crop is None:  # resize both sides (FID-style Inception, pixels)
            if tuple(x.shape[-2:]) != (self.resize, self.resize):
                x = F.interpolate(
                    x,
                    size=(self.resize, self.resize),
                    mode=self.mode,
                    align_corners=False,
                    antialias=True,
                )
        else:
            x = _center_crop(_resize_short(x, self.resize, self.mode), self.crop)
        if self.mode == "bicubic":
            x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clips to the pixel range too
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Subtract the mean and divide by the std of the model's training data."""
        if self.mean is not None:
            x = (x - self.mean.to(x)) / self.std.to(x)
        return x
