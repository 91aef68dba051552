"""Kernels: fused Triton kernels for the GPU and their plain-PyTorch references (used on the CPU
and by the tests). One sub-package per kernel family (``quant``: weight-only quantized linears)."""
