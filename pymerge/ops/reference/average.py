"""Weighted sums: `linear` (no base) and `task_arithmetic` (base + lambda * sum of deltas).

The op order written in the docstrings is the contract the compiled kernels reproduce
bit for bit: each step is one IEEE fp32 operation, never fused (no FMA / addcmul).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.ops.reference._common import (
    FLOAT_DTYPES,
    check_inputs,
    f32,
    finish,
    per_model,
    resolve_out_dtype,
)


def _f32_scalar(x: float, device=None) -> torch.Tensor:
    """A Python float rounded to fp32 (nearest-even), as a 0-dim fp32 tensor.

    Tensor-tensor products keep torch from doing the arithmetic with a double scalar.
    """
    return torch.tensor(float(x), dtype=torch.float32, device=device)


def _check_out_dtype(out_dtype: torch.dtype) -> torch.dtype:
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not one of fp32, fp16, bf16")
    return out_dtype


def _check_finite_scalar(value: float, name: str) -> float:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def scale_factor(weights: Sequence[float], lam: float, normalize: bool) -> float:
    """c = fp32(lam / s) if normalize else fp32(lam), s = ((w_0 + w_1) + ...) in float64.

    s sums the weights as given (Python floats, not their fp32 roundings), left to right.
    Raises ValueError when normalize and s == 0.
    """
    lam = _check_finite_scalar(lam, "lam")
    if normalize:
        s = 0.0
        for w in weights:
            s += float(w)
        if s == 0.0:
            raise ValueError("normalize: the weights sum to 0")
        c = lam / s
    else:
        c = lam
    return float(torch.tensor(c, dtype=torch.float32))


def linear_combine(
    base: torch.Tensor | None,
    deltas: torch.Tensor,
    weights=None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    shape=None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The accumulation shared by weighted_sum, dare_linear and breadcrumbs.

    deltas: fp32 [N, numel] (x_i). With w_i = fp32(weights[i]) and c = scale_factor(...):
        acc = +0 (fp32)
        for i = 0..N-1:  acc = acc + (w_i * x_i)      # product rounded, then the add
        out = f32(base) + acc * c   if base is given, else   acc * c
        result = out cast once to out_dtype (round-to-nearest-even)
    shape defaults to base.shape (or [numel]); out_dtype to base.dtype (or fp32).
    """
    if deltas.dim() != 2 or deltas.dtype != torch.float32:
        raise ValueError("deltas must be an fp32 tensor of shape [N, numel]")
    n, numel = deltas.shape
    if n == 0:
        raise ValueError("at least one model tensor is needed")
    if base is not None and base.numel() != numel:
        raise ValueError(f"base has {base.numel()} elements, deltas have {numel}")
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    c = _f32_scalar(scale_factor(w, lam, normalize), deltas.device)
    if shape is None:
        shape = base.shape if base is not None else (numel,)
    if out_dtype is None:
        out_dtype = base.dtype if base is not None else torch.float32
    _check_out_dtype(out_dtype)
    acc = torch.zeros(numel, dtype=torch.float32, device=deltas.device)
    for i in range(n):
        acc = acc + _f32_scalar(w[i], deltas.device) * deltas[i]
    scaled = acc * c
    out = f32(base).reshape(-1) + scaled if base is not None else scaled
    return finish(out, shape, out_dtype)


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights=None,
    *,
    base: torch.Tensor | None = None,
    lam: float = 1.0,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out = base + c * sum_i w_i (theta_i - base)  or  c * sum_i w_i theta_i  (no base).

    c = lam / sum(weights) when normalize (sum == 0 raises ValueError), else lam; weights
    None means all 1. `linear` is (no base, normalize=True); `task_arithmetic` is (base,
    lam=lambda, normalize=False by default).

    Exact fp32 op order (all fp32, each op rounded, no FMA):
        x_i = f32(theta_i) - f32(theta_0)   if base is given, else f32(theta_i)
        w_i = fp32(weights[i])
        acc = +0
        for i = 0..N-1 in order:  acc = acc + (w_i * x_i)
        c = fp32(lam / s) if normalize else fp32(lam), s = ((w_0 + w_1) + ...) in float64
            over the weights as given; lam / s divided in float64, then rounded once
        out = f32(theta_0) + acc * c   if base is given, else   acc * c
        result = out cast once to out_dtype (default: tensors[0].dtype), nearest-even.
    """
    tensors = list(tensors)
    check_inputs(tensors, base)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    if base is None:
        xs = torch.stack([f32(t).reshape(-1) for t in tensors])
    else:
        b = f32(base).reshape(-1)
        xs = torch.stack([f32(t).reshape(-1) - b for t in tensors])
    return linear_combine(
        base,
        xs,
        weights,
        lam=lam,
        normalize=normalize,
        shape=tensors[0].shape,
        out_dtype=out_dtype,
    )
