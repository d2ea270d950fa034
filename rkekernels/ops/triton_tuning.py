"""Tile configurations of the Triton score kernels: fixed in the interpreter, timed on a GPU.

On a GPU a few configurations are timed once per problem key (d, m, number of bandwidths, flags,
dtype, precision, size bucket) on at most 16,384 rows and the fastest is kept (`tuned_configs`);
problems below 4,096 rows use the first configuration untimed. Under ``TRITON_INTERPRET=1`` a
single configuration runs (block 64, feature chunk 16, bands of 2). `check_device` is the device
check of every Triton entry point (scores and guidance).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import triton

__all__ = [
    "BWD_INTERP",
    "FWD_INTERP",
    "check_device",
    "config",
    "interpreted",
    "next_pow2",
    "tuned_configs",
]


@triton.jit
def _probe():
    pass


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_probe).__name__ == "InterpretedFunction"


# interpreter: few programs (its cost is per operation), still several bands and column blocks
FWD_INTERP = {"BLOCK": 64, "BLOCK_D": 16, "GROUP": 2, "num_warps": 4, "num_stages": 1}
BWD_INTERP = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 1}

# Hopper candidates; the first of each list is the untimed default for small problems. Chosen by
# compiling for sm_90 (Triton 3.9, no GPU at hand): these fit in registers or spill <= 24 bytes in
# the exact-float32 (FMA) dot, none in the TF32 / bfloat16 (tensor-core) dots.
_FWD_GPU = [
    {"BLOCK": 128, "BLOCK_D": 16, "GROUP": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK": 128, "BLOCK_D": 16, "GROUP": 8, "num_warps": 16, "num_stages": 3},
    {"BLOCK": 128, "BLOCK_D": 32, "GROUP": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK": 64, "BLOCK_D": 32, "GROUP": 8, "num_warps": 4, "num_stages": 3},
]
_FWD_GPU_F64 = [
    {"BLOCK": 64, "BLOCK_D": 16, "GROUP": 8, "num_warps": 4, "num_stages": 2},
    {"BLOCK": 32, "BLOCK_D": 32, "GROUP": 8, "num_warps": 4, "num_stages": 2},
]
_BWD_GPU = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 16, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 16, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 16, "num_warps": 16, "num_stages": 2},
]
_BWD_GPU_F64 = [
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2},
]
_TUNE_MIN_ROWS = 4096
_TUNE_MAX_ROWS = 16384
_tuned: dict[tuple, dict] = {}


def tuned_configs() -> dict[tuple, dict]:
    """The tile configurations chosen so far, by problem key (a copy; for benchmarks/reports)."""
    return dict(_tuned)


def config(kind: str, key: tuple, fp64: bool, n: int, run: Callable[[dict, int], Any]) -> dict:
    """The tile configuration of the ``kind`` ("fwd" or "bwd") kernel for a problem: the fixed
    one in the interpreter, else one of the candidates (timed once per key, see `_pick`)."""
    if interpreted():
        return FWD_INTERP if kind == "fwd" else BWD_INTERP
    if kind == "fwd":
        cands = _FWD_GPU_F64 if fp64 else _FWD_GPU
    else:
        cands = _BWD_GPU_F64 if fp64 else _BWD_GPU
    return _pick((kind, *key), cands, n, run)


def _pick(key: tuple, candidates: list[dict], n: int, run: Callable[[dict, int], Any]) -> dict:
    """The tile configuration for a problem: timed once per key on a GPU, fixed otherwise."""
    if len(candidates) == 1 or n < _TUNE_MIN_ROWS:
        return candidates[0]
    bucket = min(1 << (n - 1).bit_length(), _TUNE_MAX_ROWS)
    key = (*key, bucket)
    if key in _tuned:
        return _tuned[key]
    rows = min(n, _TUNE_MAX_ROWS)
    best, best_ms = candidates[0], math.inf
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: run(cfg, rows), warmup=5, rep=20)
        except Exception:  # a configuration that does not fit this GPU (shared memory, registers)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _tuned[key] = best
    return best


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(v - 1, 0).bit_length()


def check_device(xc: torch.Tensor) -> None:
    """Raise unless the kernels can run on ``xc``'s device (CUDA, or any under the interpreter)."""
    if xc.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"backend='triton' got tensors on {xc.device}: the kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before rkekernels is imported to run them on the CPU"
        )
