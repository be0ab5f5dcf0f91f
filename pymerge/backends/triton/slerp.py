"""slerp with the Triton kernels (triton_kernels/slerp.py)."""

from __future__ import annotations

import math

import torch

from pymerge.backends.triton._lib import check_device, kernels
from pymerge.ops.reference._common import FLOAT_DTYPES
from pymerge.ops.reference.average import _check_out_dtype
from pymerge.ops.reference.slerp import DOT_THRESHOLD, NORM_EPS, _rows

__all__ = ["slerp"]


def _coefficients(xx: torch.Tensor, yy: torch.Tensor, xy: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb) fp32 [rows] from the fp64 row sums: the reference's formula, step for step, on the device."""
    t64 = torch.tensor(t, dtype=torch.float64, device=xx.device)
    one = torch.tensor(1.0, dtype=torch.float64, device=xx.device)
    na = torch.sqrt(xx)
    nb = torch.sqrt(yy)
    na = torch.where(na <= NORM_EPS, one, na)
    nb = torch.where(nb <= NORM_EPS, one, nb)
    dot = (xy / (na * nb)).clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    ca = torch.sin((one - t64) * theta) / sin_theta
    cb = torch.sin(t64 * theta) / sin_theta
    lerp = dot.abs() > DOT_THRESHOLD
    ca = torch.where(lerp, one - t64, ca)
    cb = torch.where(lerp, t64, cb)
    return ca.to(torch.float32), cb.to(torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same contract as pymerge.ops.reference.slerp (out_dtype: fp32, fp16 or bf16).

    Bit-identical on lerp rows (|dot| > 0.9995); on slerp rows the fp64 row sums are
    added in another order than torch's, so a coefficient may differ by one fp32 ulp
    (rarely; then the output by about an ulp), see triton_kernels/slerp.py.
    """
    k = kernels()
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"slerp: {name} has dtype {x.dtype}, not one of fp32, fp16, bf16")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t = {t} is not finite")
    device = check_device([a, b])
    out_dtype = _check_out_dtype(a.dtype if out_dtype is None else out_dtype)
    rows, cols = _rows(a.shape)
    out = torch.empty(a.shape, dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    x = a.detach().contiguous().reshape(rows, cols)
    y = b.detach().contiguous().reshape(rows, cols)
    ca, cb = _coefficients(*k.slerp.row_sums(x, y), t)
    k.slerp.combine(out.view(rows, cols), x, y, ca, cb)
    return out
