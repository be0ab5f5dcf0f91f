"""Row-wise slerp on the CPU (csrc/cpu/slerp.cpp)."""

from __future__ import annotations

import math

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, check_cpu, lib, tag
from pymerge.ops.reference.slerp import DOT_THRESHOLD, NORM_EPS, _rows

__all__ = ["slerp"]


def _coefficients(stats: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb) fp32 [rows] from the fp64 row sums [3, rows], with the reference's torch formulas.

    The same torch ops on tensors of the same size and layout as in the
    reference (each row sum contiguous), so the same acos/sin implementation
    runs: given equal sums the coefficients are the same bits.
    """
    aa, bb, ab = stats[0], stats[1], stats[2]
    t64 = torch.tensor(t, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    na = torch.sqrt(aa)
    nb = torch.sqrt(bb)
    na = torch.where(na <= NORM_EPS, one, na)
    nb = torch.where(nb <= NORM_EPS, one, nb)
    dot = (ab / (na * nb)).clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    ca = torch.sin((one - t64) * theta) / sin_theta
    cb = torch.sin(t64 * theta) / sin_theta
    lerp = dot.abs() > DOT_THRESHOLD
    ca = torch.where(lerp, one - t64, ca)
    cb = torch.where(lerp, t64, cb)
    return ca.to(torch.float32), cb.to(torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row-wise slerp from `a` (t = 0) to `b` (t = 1); the reference's semantics.

    Pass 1 (kernel): per row fp64 sum x*x, sum y*y, sum x*y (exact products,
    fixed-order compensated sums). Coefficients: the reference's fp64 formulas,
    rounded to fp32. Pass 2 (kernel): out = (ca * x) + (cb * y) in fp32, one
    rounding to out_dtype (default a.dtype). Bit for bit equal to the reference
    on lerp rows; on slerp rows too unless the last-bit difference between the
    two fp64 summation orders moves an fp32 coefficient across a rounding
    boundary (then the output is within a few ulps of the output dtype).
    """
    kernels = lib()
    check_cpu(a, "a")
    check_cpu(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a_tag = tag(a, "slerp: a")
    b_tag = tag(b, "slerp: b")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t = {t} is not finite")
    out_dtype = a.dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")

    out = empty(a.shape, dtype=out_dtype)
    rows, cols = _rows(a.shape)
    if out.numel() == 0:
        return out
    a_c = a.detach().contiguous()
    b_c = b.detach().contiguous()
    stats = empty((3, rows), dtype=torch.float64)
    kernels.slerp_row_stats(a_c.data_ptr(), a_tag, b_c.data_ptr(), b_tag, rows, cols, stats.data_ptr())
    ca, cb = _coefficients(stats, t)
    kernels.slerp_combine(out.data_ptr(), DTYPE_TAGS[out_dtype], a_c.data_ptr(), a_tag, b_c.data_ptr(), b_tag,
                          rows, cols, ca.data_ptr(), cb.data_ptr())
    return out
