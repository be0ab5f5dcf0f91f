"""Row-wise slerp on the GPU (csrc/cuda/slerp.cu)."""

from __future__ import annotations

import math

import torch

from pymerge.backends.cuda._lib import contiguous, lib, on_device, out_tag, same_device, stream, tag
from pymerge.ops.reference.slerp import DOT_THRESHOLD, NORM_EPS, _rows

__all__ = ["slerp"]


def _coefficients(stats: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb) fp32 [rows] from the fp64 row sums [3, rows]: the reference's torch formulas, step for step.

    Run on the sums' device with the same ops on tensors of the same size as the
    reference's, so given equal sums the coefficients are the same bits.
    """
    aa, bb, ab = stats[0], stats[1], stats[2]
    t64 = torch.tensor(t, dtype=torch.float64, device=stats.device)
    one = torch.tensor(1.0, dtype=torch.float64, device=stats.device)
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


def row_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp64 [3, rows]: per row sum x*x, sum y*y, sum x*y of contiguous a, b (fixed reduction order)."""
    kernels = lib()
    device = a.device
    rows, cols = _rows(a.shape)
    stats = torch.zeros((3, rows), dtype=torch.float64, device=device)
    if rows == 0 or cols == 0:
        return stats
    partials = torch.empty((rows * kernels.slerp_segments(cols), 3), dtype=torch.float64, device=device)
    with on_device(device):
        kernels.slerp_row_stats(a.data_ptr(), tag(a, "slerp: a"), b.data_ptr(), tag(b, "slerp: b"), rows, cols,
                                partials.data_ptr(), stats.data_ptr(), stream(device))
    return stats


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row-wise slerp from `a` (t = 0) to `b` (t = 1); the reference's semantics.

    Pass 1 (kernel): per row fp64 sum x*x, sum y*y, sum x*y (exact products,
    a fixed-order reduction). Coefficients: the reference's fp64 torch formulas
    on the device, rounded to fp32. Pass 2 (kernel): out = (ca * x) + (cb * y)
    in fp32, one rounding to out_dtype (default a.dtype). Bit for bit equal to
    the reference on lerp rows, and on slerp rows whenever the coefficients
    agree; the two fp64 summation orders can move a coefficient by one fp32 ulp
    (rarely), and the output then by about one ulp of the output dtype.
    """
    kernels = lib()
    device = same_device([("a", a), ("b", b)])
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a_tag = tag(a, "slerp: a")
    b_tag = tag(b, "slerp: b")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t = {t} is not finite")
    out_dtype = a.dtype if out_dtype is None else out_dtype
    o_tag = out_tag(out_dtype)

    out = torch.empty(a.shape, dtype=out_dtype, device=device)
    rows, cols = _rows(a.shape)
    if out.numel() == 0:
        return out
    a_c = contiguous(a)
    b_c = contiguous(b)
    ca, cb = _coefficients(row_stats(a_c, b_c), t)
    with on_device(device):
        kernels.slerp_combine(out.data_ptr(), o_tag, a_c.data_ptr(), a_tag, b_c.data_ptr(), b_tag, rows, cols,
                              ca.data_ptr(), cb.data_ptr(), stream(device))
    return out
