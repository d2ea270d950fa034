"""Validation and conversion at the public boundary (SPEC section 4).

Everything public in rkekernels validates its arguments here, once, with a message that names the
argument; the kernels behind it trust their inputs.

- `as_tensor(x, "x")`: torch tensors, numpy arrays, anything with ``__dlpack__`` (JAX, CuPy), and
  Python sequences become a floating torch tensor. Integers and bools become float32,
  float16/bfloat16 are upcast to float32 (accumulation happens in float32 or better); complex,
  string and object data raise TypeError.
- `check_matrix(x, "x")`: 2-D (n, d), n >= 1 (or 0 with ``allow_empty``), d >= 1, all finite;
  `check_same_rows(x, t)`: one prompt embedding per sample; `check_single_sigma(sigma_t)`.
- `check_sigmas(sigma, "sigma")`: one positive finite float or a non-empty sequence of them.
- `check_backend(backend)`: "auto", "torch" or "triton" (installed).
- `to_output(value, like_torch)`: a 0-dim/1-D tensor for torch input, else float / numpy array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "as_tensor",
    "check_backend",
    "check_finite",
    "check_matrix",
    "check_same_device",
    "check_same_rows",
    "check_sigma",
    "check_sigmas",
    "check_single_sigma",
    "is_torch",
    "to_output",
    "triton_available",
]

BACKENDS = ("auto", "torch", "triton")

_FLOAT_KEEP = (torch.float32, torch.float64)


class BackendUnavailableError(ImportError, ValueError):
    """The requested backend cannot run here (for example Triton is not installed).

    Subclasses both ImportError (what is missing) and ValueError (a bad ``backend`` argument).
    """


def is_torch(x: Any) -> bool:
    """True when ``x`` is a torch tensor (outputs then stay tensors, with autograd)."""
    return isinstance(x, torch.Tensor)


def _numpy_kind_error(arr: np.ndarray, name: str) -> None:
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{name} has complex dtype {arr.dtype}; RKE needs real-valued data")
    if kind in "USO":
        raise TypeError(
            f"{name} has non-numeric dtype {arr.dtype} (strings or objects); "
            "pass a real-valued numeric array"
        )
    if kind in "mMV":
        raise TypeError(f"{name} has unsupported dtype {arr.dtype}; pass real-valued numbers")


def _odd_tensor_error(t: torch.Tensor, name: str) -> None:
    """Sparse, quantized and nested tensors: a clear TypeError instead of a raw torch error."""
    if t.layout != torch.strided:
        raise TypeError(
            f"{name} is a {t.layout} tensor; pass a dense (strided) tensor, e.g. {name}.to_dense()"
        )
    if t.is_quantized:
        raise TypeError(f"{name} is a quantized tensor; pass {name}.dequantize()")
    if getattr(t, "is_nested", False):
        raise TypeError(f"{name} is a nested tensor; pass a dense (n, d) tensor")


def as_tensor(x: Any, name: str, *, device: torch.device | None = None) -> torch.Tensor:
    """Convert ``x`` to a floating torch tensor (float32 or float64), without copying if possible.

    Args:
        x: torch tensor, numpy array, array with ``__dlpack__`` (JAX, CuPy) or nested sequence.
        name: argument name used in error messages.
        device: optional device to move a non-torch input to.

    Raises:
        TypeError: complex, string, object or otherwise non-numeric data.
    """
    if x is None:
        raise TypeError(f"{name} must be an array or tensor, got None")
    if isinstance(x, torch.Tensor):
        t = x
        _odd_tensor_error(t, name)
    elif isinstance(x, np.ndarray | np.generic):
        if isinstance(x, np.ma.MaskedArray) and np.ma.getmaskarray(x).any():
            raise TypeError(
                f"{name} is a numpy masked array with masked entries, and the mask would be "
                f"ignored: drop the masked rows (e.g. {name}[~{name}.mask.any(1)].data) or fill "
                f"them ({name}.filled(value))"
            )
        arr = np.asarray(x)  # a 0-d array stays 0-d (ascontiguousarray would make it 1-d)
        _numpy_kind_error(arr, name)
        t = torch.from_numpy(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    elif hasattr(x, "__dlpack__") and not isinstance(x, str | bytes):
        try:
            t = torch.from_dlpack(x)
        except Exception as exc:  # pragma: no cover - depends on the foreign library
            raise TypeError(
                f"{name} exposes __dlpack__ but torch could not import it: {exc}"
            ) from exc
    elif isinstance(x, str | bytes):
        raise TypeError(f"{name} is a string; pass a real-valued numeric array")
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{name} could not be converted to an array: {exc}") from exc
        _numpy_kind_error(arr, name)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise TypeError(f"{name} has complex dtype {t.dtype}; RKE needs real-valued data")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    elif t.dtype not in _FLOAT_KEEP:
        t = t.to(torch.float32)  # float16 / bfloat16 / float8: accumulate in float32
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
    return t


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf (one reduction, done once at the boundary).

    Checked in slices of about 4M entries along the first dimension (one host sync at the end):
    ``torch.isfinite`` of the whole array would hold temporaries larger than the data itself.
    """
    if not x.numel() or x.device.type == "meta":
        return
    xd = x.detach()
    rows = max(1, (1 << 22) // max(1, xd[0].numel())) if xd.dim() else 1
    parts = xd.split(rows) if xd.dim() else (xd,)
    if not bool(torch.stack([torch.isfinite(p).all() for p in parts]).all()):
        bad = ~torch.isfinite(xd)
        n_bad = int(bad.sum())
        where = ""
        if xd.dim():  # the first row (along the first dimension) holding one
            where = f", first at row {int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])}"
        raise ValueError(f"{name} contains NaN or Inf ({n_bad} non-finite entries{where})")


def check_matrix(
    x: torch.Tensor,
    name: str,
    *,
    allow_empty: bool = False,
    width: str = "d",
    hint: str | None = None,
) -> torch.Tensor:
    """Check that ``x`` is a finite 2-D (n, d) matrix with n >= 1 and d >= 1; return it.

    ``allow_empty``: n = 0 is fine (an empty shard or batch, any width); ``width`` names the
    second dimension in the messages ("d", or "m" for prompt embeddings); ``hint``: what to do
    about a wrong rank, instead of the reshape advice (the command line names its options).
    """
    if x.dim() != 2:
        if hint is None and x.dim() > 2:
            hint = f"reshape it with {name}.reshape(len({name}), -1)"
        elif hint is None:
            hint = f"for n points in 1-D use {name}.reshape(-1, 1)"
            if allow_empty:
                hint += f"; an empty one is (0, {width})"
        raise ValueError(f"{name} must be 2-D (n, {width}); got shape {tuple(x.shape)}: {hint}")
    if x.shape[0] == 0:
        if allow_empty:
            return x
        raise ValueError(f"{name} is empty (n = 0): need at least one sample")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features ({width} = 0); got shape {tuple(x.shape)}")
    check_finite(x, name)
    return x


def check_same_rows(x: torch.Tensor, t: torch.Tensor, x_name: str = "x", t_name: str = "t") -> None:
    """Raise ValueError unless ``x`` and its prompt embeddings ``t`` have the same rows."""
    if t.shape[0] != x.shape[0]:
        raise ValueError(
            f"{x_name} and {t_name} must have the same number of rows n: {x_name} has "
            f"{x.shape[0]}, {t_name} has {t.shape[0]} (one prompt embedding per sample)"
        )


def check_single_sigma(sigma: Any, name: str = "sigma_t") -> float:
    """One bandwidth (see `check_sigma`); a sequence gets the message that says where it goes."""
    if isinstance(sigma, list | tuple) or (isinstance(sigma, torch.Tensor) and sigma.numel() > 1):
        raise ValueError(
            f"{name} must be a single bandwidth; several bandwidths go in sigma (for x)"
        )
    return check_sigma(sigma, name)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError when the given tensors live on different devices."""
    present = [(k, v) for k, v in tensors.items() if v is not None]
    if not present:
        return
    k0, v0 = present[0]
    for k, v in present[1:]:
        if v.device != v0.device:
            raise ValueError(
                f"{k} is on {v.device} but {k0} is on {v0.device}; move them to the same device"
            )


def _no_grad_sigma(sigma: torch.Tensor, name: str) -> None:
    if sigma.requires_grad:
        raise ValueError(
            f"{name} is a tensor that requires grad, but the scores are not differentiable in "
            f"the bandwidth (it would be silently detached): pass {name}.detach() or a float"
        )


def check_sigma(sigma: Any, name: str) -> float:
    """One bandwidth: a finite float > 0."""
    if isinstance(sigma, torch.Tensor):
        _no_grad_sigma(sigma, name)
        if sigma.numel() != 1:
            raise ValueError(f"{name} must be a single number here; got shape {tuple(sigma.shape)}")
        sigma = sigma.detach().cpu().item()
    if isinstance(sigma, bool) or not isinstance(sigma, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a positive float, got {type(sigma).__name__}")
    s = float(sigma)
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {sigma!r}")
    return s


def check_sigmas(sigma: Any, name: str) -> tuple[list[float], bool]:
    """A bandwidth or a sequence of them.

    Returns:
        (sigmas, many): the list of floats and whether the caller passed a sequence (then the
        result is 1-D over the bandwidths).
    """
    if isinstance(sigma, torch.Tensor):
        _no_grad_sigma(sigma, name)
    if isinstance(sigma, torch.Tensor | np.ndarray) and np.ndim(sigma) == 1:
        sigma = [float(v) for v in (sigma.tolist())]
    if isinstance(sigma, Sequence) and not isinstance(sigma, str | bytes):
        if len(sigma) == 0:
            raise ValueError(f"{name} is an empty sequence; give at least one bandwidth")
        return [check_sigma(s, f"{name}[{i}]") for i, s in enumerate(sigma)], True
    return [check_sigma(sigma, name)], False


def triton_available() -> bool:
    """True when Triton imports (kernels can then run on CUDA, or on CPU under TRITON_INTERPRET)."""
    try:
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(backend: Any, device: torch.device) -> str:
    """Resolve ``backend`` to "torch" or "triton" for data on ``device``.

    "auto" picks Triton for CUDA tensors when Triton imports, else the torch path.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise BackendUnavailableError(
            "backend='triton' needs Triton: install it with `pip install triton` "
            "(or `pip install rkekernels[triton]`), or use backend='torch'"
        )
    return backend


def to_output(value: torch.Tensor, like_torch: bool, many: bool) -> Any:
    """Shape the result as SPEC section 3 says.

    torch input: a tensor (0-dim, or 1-D for several bandwidths) that keeps autograd.
    other input: a Python float (numpy array for several bandwidths).
    """
    if not many:
        value = value.reshape(())
    if like_torch:
        return value
    arr = value.detach().cpu().double().numpy()
    return arr if many else float(arr)
