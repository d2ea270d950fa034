"""Images in, and the differentiable resize / crop / normalise of the image encoders.

`load_image` (a file to a (3, H, W) float tensor in [0, 1]), `_as_chw` (any supported image item
to (3, H, W)) and `_Transform` (the encoders' preprocessing on a (b, 3, H, W) batch, with
gradients). Used by `rkekernels.adapters.encoders`, which re-exports `load_image`.
"""

from __future__ import annotations

import os
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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


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
