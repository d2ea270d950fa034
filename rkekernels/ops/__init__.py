"""Kernels, one op one file per tier: ``*_torch.py`` (streaming torch), ``*_triton.py`` (fused)."""
