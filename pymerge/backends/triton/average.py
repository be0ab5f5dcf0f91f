"""weighted_sum with the Triton kernel (triton_kernels/average.py): linear and task_arithmetic."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.triton._lib import check_device, flat, fp32_tensor, kernels
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, scale_factor

__all__ = ["weighted_sum"]


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights=None,
    *,
    base: torch.Tensor | None = None,
    lam: float = 1.0,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract and op order as pymerge.ops.reference.weighted_sum (bit-identical results)."""
    k = kernels()
    tensors = list(tensors)
    check_inputs(tensors, base)
    device = check_device(tensors + [base])
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    w = per_model(weights, len(tensors), "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    c = scale_factor(w, lam, normalize)  # already an fp32 value
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    k.average.weighted_sum(
        out.view(-1),
        [flat(t) for t in tensors],
        fp32_tensor(w, device),
        c,
        base=flat(base) if base is not None else None,
    )
    return out
