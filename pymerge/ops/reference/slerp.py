"""Torch reference of slerp (spherical linear interpolation), row-wise."""

from __future__ import annotations

import math

import torch

from pymerge.ops.reference._common import FLOAT_DTYPES, f32, finish

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _rows(shape: torch.Size) -> tuple[int, int]:
    """(rows, row length): leading axis = rows; a 1-D tensor or a 0-d tensor is one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row coefficients (ca, cb) in fp32, shape [rows]; see `slerp`."""
    rows, cols = _rows(a.shape)
    a64 = f32(a).reshape(rows, cols).to(torch.float64)
    b64 = f32(b).reshape(rows, cols).to(torch.float64)
    t64 = torch.tensor(float(t), dtype=torch.float64, device=a.device)
    one = torch.tensor(1.0, dtype=torch.float64, device=a.device)
    na = torch.sqrt((a64 * a64).sum(dim=1))
    nb = torch.sqrt((b64 * b64).sum(dim=1))
    na = torch.where(na <= NORM_EPS, one, na)
    nb = torch.where(nb <= NORM_EPS, one, nb)
    dot = ((a64 * b64).sum(dim=1) / (na * nb)).clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    ca = torch.sin((one - t64) * theta) / sin_theta
    cb = torch.sin(t64 * theta) / sin_theta
    lerp = dot.abs() > DOT_THRESHOLD
    # where() keeps the NaN of sin(0)/sin(0) on parallel rows out of the result
    ca = torch.where(lerp, one - t64, ca)
    cb = torch.where(lerp, t64, cb)
    return ca.to(torch.float32), cb.to(torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Row-wise slerp from `a` (t = 0) to `b` (t = 1).

    Rows: the leading axis, each row the rest flattened; a 1-D tensor is one
    row, a 0-d tensor one row of one element. `t` is a Python float (used in
    fp64); a and b have one shape, any of fp32/fp16/bf16.

    Per row, with x = f32(a row), y = f32(b row):
      1. In fp64 (x, y upcast exactly): na = sqrt(sum x*x), nb = sqrt(sum y*y)
         (fp64 sums, order unspecified); a norm <= 1e-8 becomes 1;
         dot = clamp(sum(x*y) / (na*nb), -1, 1).
      2. In fp64: if |dot| > 0.9995 (lerp branch): ca = 1 - t, cb = t;
         else theta = acos(dot), ca = sin((1 - t)*theta) / sin(theta),
         cb = sin(t*theta) / sin(theta).
      3. ca, cb rounded to fp32 (RNE).
      4. Per element in fp32, three rounded ops, no FMA:
         out = (ca * x) + (cb * y).
      5. One rounding to out_dtype (default a.dtype).

    Steps 4-5 are exact given (ca, cb), so the lerp branch is bit-exact on
    every backend; the slerp branch depends on the platform's acos/sin.
    A zero row (norm <= 1e-8) gives dot = 0, i.e. theta = pi/2.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"slerp: {name} has dtype {x.dtype}, not one of fp32, fp16, bf16")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"slerp: t = {t} is not finite")
    out_dtype = a.dtype if out_dtype is None else out_dtype
    rows, cols = _rows(a.shape)
    ca, cb = slerp_coefficients(a, b, t)
    x = f32(a).reshape(rows, cols)
    y = f32(b).reshape(rows, cols)
    out = ca[:, None] * x
    out = out + cb[:, None] * y
    return finish(out, a.shape, out_dtype)
