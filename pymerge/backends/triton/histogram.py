"""Digit histograms of selection keys with the Triton kernels (triton_kernels/histogram.py), for model-scope statistics.

Same results as the torch versions in pymerge.ops.selection (`abs_tau_histogram`,
`order_key_histogram`); the sums feed `RadixSelect.add_histogram`. The histogram
stays on the tensors' device.
"""

from __future__ import annotations

import torch

from pymerge.backends.triton._lib import check_device, flat, kernels
from pymerge.ops.selection import RADIX_BINS, _check_digit

__all__ = ["abs_tau_histogram", "order_key_histogram"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{what}: dtype {t.dtype} is not one of fp32, fp16, bf16")


def abs_tau_histogram(base: torch.Tensor, tensor: torch.Tensor, *, shift: int, prefix: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram of one 16-bit digit of abs_key(f32(tensor) - f32(base)), NaN as
    key 0xFFFFFFFF; shift=16: high digit, shift=0: low digit of the keys whose high digit is
    prefix. See pymerge.ops.selection.abs_tau_histogram."""
    k = kernels()
    _check_digit(shift, prefix)
    device = check_device([base, tensor], "abs_tau_histogram")
    if tensor.shape != base.shape:
        raise ValueError(f"tensor: shape {tuple(tensor.shape)} != base {tuple(base.shape)}")
    _check_dtype(base, "base")
    _check_dtype(tensor, "tensor")
    out = torch.zeros(RADIX_BINS, dtype=torch.int64, device=device)
    p = None if shift == 16 else int(prefix)
    return k.histogram.digit_histogram(out, flat(base), flat(tensor), k.histogram.KEY_ABS, p)


def order_key_histogram(values: torch.Tensor, *, shift: int, prefix: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram of one 16-bit digit of the order keys of values (-0.0 as +0.0,
    NaN as key 0xFFFFFFFF); fp16/bf16 are upcast exactly. See
    pymerge.ops.selection.order_key_histogram."""
    k = kernels()
    _check_digit(shift, prefix)
    device = check_device([values], "order_key_histogram")
    _check_dtype(values, "values")
    out = torch.zeros(RADIX_BINS, dtype=torch.int64, device=device)
    p = None if shift == 16 else int(prefix)
    return k.histogram.digit_histogram(out, None, flat(values), k.histogram.KEY_ORDER, p)
