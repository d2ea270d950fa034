"""Root pytest set-up, shared by tests/ and the doctests under rkekernels/.

Without a CUDA GPU, Triton kernels run in the interpreter on CPU tensors. TRITON_INTERPRET must
be set before any kernel is defined, that is before rkekernels imports Triton: here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
