"""Shared test set-up and helpers (tests import them with ``from tests.conftest import ...``).

- Without a GPU, Triton kernels run in the interpreter: the root conftest.py sets
  TRITON_INTERPRET=1 before any kernel is defined (doctests under rkekernels/ need it too).
  Triton tests take the ``triton_device`` fixture (or `TRITON_DEVICES`): CUDA where a GPU is
  present, CPU tensors under the interpreter otherwise, so the same test means the same on both
  and nothing passes CPU tensors to backend="triton" on a GPU machine.
- TF32 is off so that float32 references stay exact.
- Fresh torch.empty buffers are poisoned with NaN so an unwritten output fails loudly.
- HF_HUB_OFFLINE=1: nothing is downloaded; encoders are tiny random-weight models (below).
- The hypothesis profile "ci" (25 examples, derandomized, no deadline) is loaded in
  `pytest_configure`.
- numba's first compile (a few seconds in a fresh environment) is paid once, by a session fixture,
  not by whichever test happens to call the fused CPU kernel first.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # in a hook, not at import: spawned ranks import this module for its helpers, and
    # hypothesis alone takes ~1.3 s to import
    from hypothesis import settings

    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile("ci")


_empty = torch.empty

#: Relative tolerances fixed per dtype (SPEC section 5).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


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


# ----------------------------------------------------------------------------- devices


def triton_ok() -> bool:
    from rkekernels._input import triton_available

    return triton_available()


def _triton_devices() -> list:
    """Where Triton kernels run here: CUDA tensors on a GPU, else CPU tensors in the interpreter."""
    if not triton_ok():
        return []
    if torch.cuda.is_available():
        return ["cuda"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ["cpu"]
    return []


#: Parameters for ``@pytest.mark.parametrize("device", TRITON_DEVICES)``.
TRITON_DEVICES = _triton_devices() or [
    pytest.param("none", marks=pytest.mark.skip(reason="Triton is not installed"))
]

#: True when the Triton kernels run in the interpreter (CPU tensors; tiny sizes only).
INTERPRETED = TRITON_DEVICES == ["cpu"]


@pytest.fixture(params=TRITON_DEVICES)
def triton_device(request) -> str:
    """The device a Triton test runs on (see the module docstring)."""
    return request.param


# --------------------------------------------------------------------------- tiny encoders
# Random-weight models built from config classes (nothing is downloaded): the image encoders of
# rkekernels.adapters.encoders, the evaluate command and encoder-feature guidance use them.

#: the size of every tiny transformer tower here (both CLIP towers, DINOv2)
TINY_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
TINY_VISION = dict(TINY_TOWER, image_size=16, patch_size=8)


def tiny_clip(seed: int = 0):
    """(CLIPModel, CLIPTokenizer): 16x16 images, a 58-token character vocabulary, D = 16."""
    import json
    import os
    import tempfile

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    text = dict(
        TINY_TOWER,
        vocab_size=64,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=text, projection_dim=16))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    d = tempfile.mkdtemp(prefix="tiny-clip-tok-")
    with open(os.path.join(d, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(d, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    return model.eval(), tok


def tiny_dinov2(seed: int = 0):
    """A random-weight Dinov2Model for 16x16 crops, D = 32."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**TINY_VISION)).eval()


@pytest.fixture(scope="session")
def tiny_encoder_dirs(tmp_path_factory):
    """{"clip": folder, "dinov2": folder}: the tiny models saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny-encoders")
    clip, tok = tiny_clip()
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    tiny_dinov2().save_pretrained(root / "dinov2")
    return {"clip": str(root / "clip"), "dinov2": str(root / "dinov2")}


def write_images(folder, n: int, *, size=16, seed: int = 0, clusters: int = 3, fmt: str = "png"):
    """n small RGB images in ``clusters`` colour groups (img_000.png, ...); returns the paths."""
    import os

    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 255, size=(clusters, 3))
    paths = []
    for i in range(n):
        s = size if isinstance(size, int) else size[i % len(size)]
        base = centres[i % clusters][None, None, :] + rng.normal(0, 12, size=(s, s, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        p = os.path.join(folder, f"img_{i:03d}.{fmt}")
        img.save(p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- helpers


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (a scalar: |a - b| / |b|)."""
    # dtype=float64 at the conversion: a Python float must not pass through float32
    a = torch.as_tensor(a.detach() if isinstance(a, torch.Tensor) else a, dtype=torch.float64)
    b = torch.as_tensor(b.detach() if isinstance(b, torch.Tensor) else b, dtype=torch.float64)
    a, b = a.cpu(), b.cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def close(got, want, rtol: float = 1e-10) -> None:
    """Same shape, and equal within ``rtol`` element by element (no absolute slack)."""
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=rtol, atol=0.0), (got, want)


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscription on a loaded machine (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _numba_compiled():
    """Compile (or load from numba's cache) the fused CPU guidance kernels once per session, for
    float32 and float64, with and without prompts, so that no test is charged for it."""
    from rkekernels import guidance_grad
    from rkekernels.ops import guidance_cpu

    if guidance_cpu.enabled():
        for dt in (torch.float32, torch.float64):
            z, f = torch.ones(2, 3, dtype=dt), torch.ones(3, 3, dtype=dt)
            guidance_grad(z, f, sigma=1.0)
            guidance_grad(z, f, cond=z, bank_cond=f, sigma=1.0, sigma_cond=1.0)
    yield
