"""Digit histograms of selection keys on the CPU (csrc/cpu/histogram.cpp), for model-scope statistics.

Same results as the torch versions in pymerge.ops.selection (`abs_tau_histogram`,
`order_key_histogram`); the sums feed `RadixSelect.add_histogram`.
"""

from __future__ import annotations

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import check_cpu, lib, tag
from pymerge.ops.selection import RADIX_BINS, _check_digit

__all__ = ["abs_tau_histogram", "order_key_histogram"]


def abs_tau_histogram(base: torch.Tensor, tensor: torch.Tensor, *, shift: int, prefix: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram of one 16-bit digit of abs_key(f32(tensor) - f32(base)), NaN as
    key 0xFFFFFFFF; shift=16: high digit, shift=0: low digit of the keys whose high digit is
    prefix. See pymerge.ops.selection.abs_tau_histogram."""
    kernels = lib()
    _check_digit(shift, prefix)
    check_cpu(base, "base")
    check_cpu(tensor, "tensor")
    if tensor.shape != base.shape:
        raise ValueError(f"tensor: shape {tuple(tensor.shape)} != base {tuple(base.shape)}")
    base_tag, in_tag = tag(base, "base"), tag(tensor, "tensor")
    base_c, tensor_c = base.detach().contiguous(), tensor.detach().contiguous()
    out = empty(RADIX_BINS, dtype=torch.int64)
    kernels.abs_tau_histogram(
        out.data_ptr(),
        base_c.data_ptr(),
        base_tag,
        tensor_c.data_ptr(),
        in_tag,
        base_c.numel(),
        shift,
        -1 if prefix is None else int(prefix),
    )
    return out


def order_key_histogram(values: torch.Tensor, *, shift: int, prefix: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram of one 16-bit digit of the order keys of values (-0.0 as +0.0,
    NaN as key 0xFFFFFFFF); fp16/bf16 are upcast exactly. See
    pymerge.ops.selection.order_key_histogram."""
    kernels = lib()
    _check_digit(shift, prefix)
    check_cpu(values, "values")
    tag(values, "values")
    x = values.detach().reshape(-1).to(torch.float32).contiguous()
    out = empty(RADIX_BINS, dtype=torch.int64)
    kernels.order_key_histogram(out.data_ptr(), x.data_ptr(), x.numel(), shift, -1 if prefix is None else int(prefix))
    return out
