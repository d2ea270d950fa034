"""Reading arrays from files: the one reader of ``rkekernels score``, ``compare`` and ``evaluate``.

- `load_array(path, key)`: one array from .npy, .npz, .pt/.pth or .safetensors, as a CPU tensor.
- `as_matrix(value, path, flatten)`: that array checked as an (n, d) matrix.

Both raise `rkekernels._errors.CLIError` with a one-line message naming the file. A module of its
own so that the command line (`rkekernels.cli`) and the evaluation workbench
(`rkekernels.evaluation`) share it without importing each other.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._errors import CLIError
from ._input import check_matrix

__all__ = [
    "FIGURE_SUFFIXES",
    "as_matrix",
    "default_max_bytes",
    "figure_path",
    "load_array",
]

#: the figure formats a path may name (matplotlib's common ones)
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff")


def _pick(arrays: dict[str, Any], key: str | None, path: Path) -> Any:
    if key is not None:
        if key not in arrays:
            raise CLIError(f"{path}: no array named {key!r}; it holds {sorted(arrays)}")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if not arrays:
        raise CLIError(f"{path}: holds no arrays")
    raise CLIError(f"{path}: holds several arrays {sorted(arrays)}; choose one with --key NAME")


def default_max_bytes() -> int:
    """The largest array a compressed .npz may inflate to by default: 8 GiB, or half the RAM
    when that is less (``--max-bytes`` raises it)."""
    limit = 8 << 30
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return limit
    return min(limit, ram // 2) if ram > 0 else limit


def _npz_member(p: Path, key: str | None, max_bytes: int | None) -> Any:
    """One array of an .npz, its declared (uncompressed) size checked before it is inflated."""
    limit = default_max_bytes() if max_bytes is None else max_bytes
    with zipfile.ZipFile(p) as z:
        sizes = {i.filename.removesuffix(".npy"): i.file_size for i in z.infolist()}
    name = _pick({k: k for k in sizes}, key, p)
    if sizes[name] > limit:
        raise CLIError(
            f"{p}: array {name!r} inflates to {sizes[name]:,} bytes, over the limit of "
            f"{limit:,}; raise it with --max-bytes if this is intended"
        )
    with np.load(p, allow_pickle=False) as data:
        return data[name]


def load_array(path: str | os.PathLike, key: str | None = None, *, max_bytes: int | None = None):
    """Load one (n, ...) array from .npy, .npz, .pt/.pth or .safetensors as a torch tensor.

    Args:
        path: the file.
        key: name of the array inside an .npz, a dict saved in .pt, or a .safetensors file;
            None picks the only array.
        max_bytes: the largest size a compressed .npz member may inflate to, checked from the
            zip header before inflating (None: `default_max_bytes`).

    Returns:
        torch.Tensor on the CPU.

    Raises:
        CLIError: missing or unreadable file, unknown extension, missing key, not an array.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from rkekernels.cli import load_array
        >>> p = os.path.join(tempfile.mkdtemp(), "x.npz")
        >>> np.savez(p, emb=np.ones((3, 2)))
        >>> load_array(p).shape
        torch.Size([3, 2])
    """
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: no such file")
    if p.is_dir():
        raise CLIError(f"{p}: is a directory, not an array file")
    ext = p.suffix.lower()
    try:
        if ext == ".npy":
            if key is not None:
                raise CLIError(f"{p}: --key applies to .npz, .pt and .safetensors files only")
            value = np.load(p, allow_pickle=False)
        elif ext == ".npz":
            value = _npz_member(p, key, max_bytes)
        elif ext in (".pt", ".pth"):
            with warnings.catch_warnings():  # torch's warnings about the pickle: not for users
                warnings.simplefilter("ignore")
                try:
                    obj = torch.load(p, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError:
                    raise CLIError(
                        f"{p}: cannot read it as .pt: not tensors saved by torch.save (a plain "
                        "pickle, or another format?); "
                        "rkekernels reads .pt files with weights_only=True, save the array with "
                        "torch.save(tensor, path) or np.save"
                    ) from None
            if isinstance(obj, dict):
                arrays = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                value = _pick(arrays, key, p)
            elif isinstance(obj, torch.Tensor):
                if key is not None:
                    raise CLIError(f"{p}: holds a single tensor, not a dict; drop --key")
                value = obj
            else:
                raise CLIError(f"{p}: holds a {type(obj).__name__}, not a tensor or dict of them")
        elif ext == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CLIError(
                    f"{p}: reading .safetensors needs the safetensors package: "
                    "pip install safetensors (or rkekernels[io])"
                ) from None
            value = _pick(load_file(str(p), device="cpu"), key, p)
        else:
            raise CLIError(
                f"{p}: unsupported file type {ext or '(none)'!r}; "
                "use .npy, .npz, .pt/.pth or .safetensors"
            )
    except CLIError:
        raise
    except Exception as exc:  # any reader failure is a bad file for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"{p}: cannot read it as {ext}: {msg}") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise CLIError(f"{p}: has non-numeric dtype {value.dtype}; need real numbers")
        # a 0-d array stays 0-d (ascontiguousarray would make it 1-d)
        value = torch.from_numpy(value if value.flags.c_contiguous else np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise CLIError(f"{p}: holds a {type(value).__name__}, not a tensor")
    if value.is_meta:
        raise CLIError(f"{p}: holds a meta tensor (a shape without data); save the real tensor")
    if value.layout != torch.strided:
        raise CLIError(f"{p}: holds a {value.layout} (sparse) tensor; save it dense (to_dense())")
    if value.is_quantized:
        raise CLIError(f"{p}: holds a quantized tensor; save it dequantized (dequantize())")
    if value.is_complex() or value.dtype == torch.bool:
        raise CLIError(f"{p}: has dtype {value.dtype}; need real numbers")
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
        value = value.to(torch.float32)  # float16 / bfloat16 / float8: scored in float32
    return value


def figure_path(path: str | os.PathLike, option: str, default_name: str) -> Path:
    """Where a figure option (``compare --plot``, ``demo --out``) writes, checked before any work.

    An existing folder gets ``default_name`` inside it. Otherwise the name must end in a figure
    suffix (`FIGURE_SUFFIXES`): ``--plot README`` is refused rather than writing README.png
    beside it, so the file replaced is always the one named. Missing parent folders are created
    when the figure is saved; a parent that is a file is refused.

    Raises:
        CLIError: one line naming the option and the path.

    Example:
        >>> import tempfile
        >>> from rkekernels._files import figure_path
        >>> d = tempfile.mkdtemp()
        >>> figure_path(d, "--out", "demo.png").name
        'demo.png'
    """
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    elif p.suffix.lower() not in FIGURE_SUFFIXES:
        raise CLIError(
            f"{option} {path}: name the file with its format, e.g. {path}.png "
            f"({', '.join(FIGURE_SUFFIXES)}), or give an existing folder"
        )
    if p.is_dir():
        raise CLIError(f"{option} {p}: is a folder, not a file")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: {parent} is a file, not a folder")
    return p


def as_matrix(value, path: str, flatten: bool):
    """``value`` checked as a 2-D (n, d) matrix by `rkekernels._input.check_matrix` (flattened
    to (n, prod ...) first with ``flatten``); its error, naming the file ``path``, as a CLIError."""
    if value.dim() > 2 and flatten:
        value = value.reshape(value.shape[0], -1)
    hint = (
        "use --flatten to treat each row as one sample"
        if value.dim() > 2
        else "save it as (n, d), one row per sample"
    )
    try:
        return check_matrix(value, path, hint=hint)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
