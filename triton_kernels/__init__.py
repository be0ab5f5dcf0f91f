"""Triton kernels, one module per op family (installed as pymerge.triton_kernels)."""
