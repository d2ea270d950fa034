"""Dense eigensolvers run on one CPU thread: `eigvalsh`, `eigh`, `eig`, `svd` and `one_thread`.

torch's CPU eigensolvers call LAPACK (MKL in the pip wheels) on the intra-op thread pool. On the
2-core AMD machine this project is measured on, with other work running, MKL's threaded solvers
were erratic and far slower than one thread (float64, best of two, torch 2.13.0+cpu):

    ========  =========================  ==================
    size      eigvalsh, 2 threads        eigvalsh, 1 thread
    ========  =========================  ==================
    256       0.44 s (KEN's null draws)  0.005 s
    512       0.29 - 7.0 s               0.04 - 0.06 s
    2,048     1.7 - 6.5 s                1.0 - 1.2 s
    4,096     7.4 - 14.8 s               7.3 - 7.4 s
    ========  =========================  ==================

(``eigh`` at 2,048: 5.1 - 41 s against 3.5 - 4.9 s.) So every eigen-decomposition of the
library on a CPU tensor runs inside `one_thread`, which sets ``torch.set_num_threads(1)`` for its
duration and restores the previous count (process-wide: other threads' torch ops in that window
run on one thread too). CUDA tensors are untouched. Autograd works as with ``torch.linalg``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["eig", "eigh", "eigvalsh", "one_thread", "svd"]


@contextlib.contextmanager
def one_thread(t: torch.Tensor | None = None) -> Iterator[None]:
    """Run the block on one intra-op thread when ``t`` is a CPU tensor (or None).

    Example:
        >>> with one_thread(torch.zeros(1)):
        ...     torch.get_num_threads()
        1
    """
    n = torch.get_num_threads()
    if (t is not None and t.device.type != "cpu") or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh(a)`` (ascending eigenvalues of symmetric (..., k, k)), on one
    CPU thread.

    Example:
        >>> eigvalsh(torch.eye(2, dtype=torch.float64) * 3).tolist()
        [3.0, 3.0]
    """
    with one_thread(a):
        return torch.linalg.eigvalsh(a)


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(a)`` (ascending eigenvalues, eigenvectors as columns), one CPU thread.

    Example:
        >>> eigh(torch.diag(torch.tensor([2.0, 1.0])))[0].tolist()
        [1.0, 2.0]
    """
    with one_thread(a):
        return torch.linalg.eigh(a)


def eig(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eig(a)`` (complex eigenvalues and eigenvectors of a general (k, k)), on one
    CPU thread.

    Example:
        >>> eig(torch.diag(torch.tensor([2.0, 1.0])))[0].real.tolist()
        [2.0, 1.0]
    """
    with one_thread(a):
        return torch.linalg.eig(a)


def svd(a: torch.Tensor, full_matrices: bool = True) -> tuple[torch.Tensor, ...]:
    """``torch.linalg.svd(a, full_matrices)`` on one CPU thread.

    Example:
        >>> svd(torch.diag(torch.tensor([2.0, 1.0])))[1].tolist()
        [2.0, 1.0]
    """
    with one_thread(a):
        return torch.linalg.svd(a, full_matrices=full_matrices)
