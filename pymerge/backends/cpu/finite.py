"""The engine's NaN/Inf check of input tensors on the CPU (csrc/cpu/finite.cpp)."""

from __future__ import annotations

import torch

from pymerge.backends.cpu._lib import check_cpu, lib, tag

__all__ = ["all_finite"]


def all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all() for fp32/fp16/bf16 CPU tensors, without its bool temporary."""
    check_cpu(t, "t")
    dtype = tag(t, "t")
    c = t.detach().contiguous()
    return bool(lib().all_finite(c.data_ptr(), dtype, c.numel()))
