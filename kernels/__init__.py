"""Triton kernels for CUDA over the `quant/` 4-bit format."""
