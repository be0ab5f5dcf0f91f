"""Shared helpers of the torch reference: upcasting, output rounding, checks.

Numerics contract (specs/methods.md): inputs are upcast to fp32, every step is
one IEEE fp32 operation (no fused multiply-add), reductions over elements are
done in fp64, and the result is rounded once to the output dtype with
round-to-nearest-even (torch's float cast).
"""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> None:
    """Raise ValueError unless all tensors (and base) are floating point with one shape."""
    if len(tensors) == 0:
        raise ValueError("at least one model tensor is needed")
    shape = tensors[0].shape if base is None else base.shape
    for i, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"model {i}: dtype {t.dtype} is not one of fp32, fp16, bf16")
        if t.shape != shape:
            raise ValueError(f"model {i}: shape {tuple(t.shape)} != {tuple(shape)}")
    if base is not None and base.dtype not in FLOAT_DTYPES:
        raise ValueError(f"base: dtype {base.dtype} is not one of fp32, fp16, bf16")


def f32(t: torch.Tensor) -> torch.Tensor:
    """The stored values upcast to fp32 (exact for fp16/bf16)."""
    return t.to(torch.float32)


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_i = f32(theta_i) - f32(theta_0), stacked and flattened to [N, numel] fp32."""
    b = f32(base).reshape(-1)
    return torch.stack([f32(t).reshape(-1) - b for t in tensors])


def resolve_out_dtype(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None) -> torch.dtype:
    return tensors[0].dtype if out_dtype is None else out_dtype


def per_model(value, n: int, name: str) -> list[float]:
    """A scalar or a length-n sequence as a list of n floats."""
    if value is None:
        return [1.0] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} models")
    return values


def finish(x32: torch.Tensor, shape, out_dtype: torch.dtype) -> torch.Tensor:
    """Round the fp32 result once to the output dtype (round-to-nearest-even)."""
    return x32.reshape(shape).to(out_dtype)
