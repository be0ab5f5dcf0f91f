"""Row-wise slerp on the CPU (csrc/cpu/slerp.cpp)."""

from __future__ import annotations

import math

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, check_cpu, lib, tag
from pymerge.ops.reference.slerp import _rows

__all__ = ["slerp"]


def _inputs(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, int, torch.Tensor, int, float]:
    check_cpu(a, "a")
    check_cpu(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a_tag = tag(a, "slerp: a")
    b_tag = tag(b, "slerp: b")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t = {t} is not finite")
    return a.detach().contiguous(), a_tag, b.detach().contiguous(), b_tag, t


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row coefficients (ca, cb) in fp32, shape [rows], as the kernel computes them.

    The reference's fp64 formulas on the kernel's row sums. They equal
    `pymerge.ops.reference.slerp.slerp_coefficients` unless a last-bit fp64
    difference (summation order, the C library's acos/sin against torch's)
    straddles an fp32 rounding boundary; then they are one fp32 ulp apart.
    """
    a_c, a_tag, b_c, b_tag, t = _inputs(a, b, t)
    rows, cols = _rows(a.shape)
    ca = empty((rows,), dtype=torch.float32)
    cb = empty((rows,), dtype=torch.float32)
    lib().slerp_coefficients(a_c.data_ptr(), a_tag, b_c.data_ptr(), b_tag, rows, cols, t, ca.data_ptr(), cb.data_ptr())
    return ca, cb


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row-wise slerp from `a` (t = 0) to `b` (t = 1); the reference's semantics.

    Per row: fp64 sum x*x, sum y*y, sum x*y (exact products, fixed-order
    compensated sums), the coefficients of `slerp_coefficients`, then
    out = (ca * x) + (cb * y) in fp32 with one rounding to out_dtype (default
    a.dtype). Rows of up to 16384 elements are read once. Bit for bit equal to
    the reference on lerp rows; on slerp rows too wherever the coefficients
    agree (see `slerp_coefficients`), else within a few ulps of the output dtype.
    """
    a_c, a_tag, b_c, b_tag, t = _inputs(a, b, t)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    out = empty(a.shape, dtype=out_dtype)
    if out.numel() == 0:
        return out
    rows, cols = _rows(a.shape)
    lib().slerp(out.data_ptr(), DTYPE_TAGS[out_dtype], a_c.data_ptr(), a_tag, b_c.data_ptr(), b_tag, rows, cols, t)
    return out
