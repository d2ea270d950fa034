"""Shared test set-up.

- Without a GPU, Triton kernels run in the interpreter: the root conftest.py sets
  TRITON_INTERPRET=1 before any kernel is defined (doctests under rkekernels/ need it too).
- TF32 is off so that float32 references stay exact.
- Fresh torch.empty buffers are poisoned with NaN so an unwritten output fails loudly.
"""

import pytest
import torch
from hypothesis import settings

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

_empty = torch.empty


def _nan_empty(*args, **kwargs):
    out = _empty(*args, **kwargs)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_empty)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def triton_ok() -> bool:
    from rkekernels._input import triton_available

    return triton_available()
