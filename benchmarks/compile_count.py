"""Count the compiled variants that Triton launches need (for benchmarks/gpu_check.py).

Triton compiles one binary per kernel and *specialisation key*: the constexpr values, num_warps
and num_stages, the dtype of every pointer and whether it is 16-byte aligned, and for every
integer argument not listed in ``do_not_specialize`` whether it equals 1 or is a multiple of 16.
On a GPU most of the first minutes of a check go into compiling, so `VariantCounter` records
the key of every launch of the library's kernels (a proxy around each kernel object, so it works
in the interpreter too, where nothing is compiled) and counts the distinct ones. On CUDA it also
reads Triton's own per-device kernel caches where the installed version exposes them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

#: (module, kernel attribute) of every Triton kernel the library launches
KERNELS = (
    ("rkekernels.ops.scores_triton", "_fwd_kernel"),
    ("rkekernels.ops.scores_triton", "_bwd_kernel"),
    ("rkekernels.ops.guidance_triton", "_guidance_state_kernel"),
)


def _no_specialize(kernel) -> set[str]:
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter keeps the jit options in .kwargs
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    arg_names = list(getattr(kernel, "arg_names", []))
    out = set()
    for v in names or ():
        out.add(arg_names[v] if isinstance(v, int) else v)
    return out


def _spec(value, specialise: bool):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        width = "i32" if -(2**31) <= value < 2**31 else "i64"
        if not specialise:
            return width
        return (width, "1" if value == 1 else "D16" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    return repr(value)


class VariantCounter:
    """Context manager: while active, every launch of `KERNELS` records its specialisation key.

    >>> with VariantCounter() as vc:
    ...     pass
    >>> vc.total, vc.by_kernel()
    (0, {})
    """

    def __init__(self, kernels: Iterable[tuple[str, str]] = KERNELS):
        self.targets = list(kernels)
        self.keys: dict[str, set] = {}
        self.launches = 0
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> VariantCounter:
        # scores_triton tells the interpreter apart by its kernel's type: answer before wrapping
        st = importlib.import_module("rkekernels.ops.scores_triton")
        mode = st.interpreted()
        self._saved.append((st, "interpreted", st.interpreted))
        st.interpreted = lambda: mode
        for mod_name, attr in self.targets:
            mod = importlib.import_module(mod_name)
            kernel = getattr(mod, attr)
            self._saved.append((mod, attr, kernel))
            setattr(mod, attr, _Proxy(self, attr, kernel))
        return self

    def __exit__(self, *exc) -> None:
        for mod, attr, obj in reversed(self._saved):
            setattr(mod, attr, obj)
        self._saved.clear()

    def record(self, name: str, kernel, args: tuple, kwargs: dict) -> None:
        skip = _no_specialize(kernel)
        names = list(getattr(kernel, "arg_names", []))
        key = [name]
        for i, v in enumerate(args):
            arg = names[i] if i < len(names) else str(i)
            key.append((arg, _spec(v, arg not in skip)))
        key += sorted((k, _spec(v, True)) for k, v in kwargs.items())
        self.keys.setdefault(name, set()).add(tuple(key))
        self.launches += 1

    @property
    def total(self) -> int:
        """Distinct (kernel, specialisation key) pairs launched: the binaries a GPU compiles."""
        return sum(len(v) for v in self.keys.values())

    def by_kernel(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self.keys.items())}


class _Proxy:
    def __init__(self, counter: VariantCounter, name: str, kernel):
        self._counter, self._name, self._kernel = counter, name, kernel

    def __getattr__(self, item):
        return getattr(self._kernel, item)

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            self._counter.record(self._name, self._kernel, args, kwargs)
            return launch(*args, **kwargs)

        return run


def triton_cache_size() -> int | None:
    """Compiled binaries in Triton's in-process caches of the library's kernels (None where the
    installed Triton does not expose them, or under the interpreter)."""
    total = 0
    for mod_name, attr in KERNELS:
        kernel = getattr(importlib.import_module(mod_name), attr)
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            cache = getattr(kernel, "cache", None)
            if not isinstance(cache, dict):
                return None
            total += sum(len(v) for v in cache.values())
            continue
        try:
            total += sum(len(v[0]) for v in caches.values())
        except (TypeError, IndexError):
            return None
    return total
