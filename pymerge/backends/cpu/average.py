"""weighted_sum on the CPU (csrc/cpu/average.cpp): linear and task_arithmetic."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, check_cpu, fp32, lib, tag, weights_list

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
    """c * sum_i w_i * x_i (+ base), the linear / task_arithmetic primitive.

    x_i = f32(tensors[i]) - f32(base) with a base, else f32(tensors[i]); the sum
    runs in fp32 in model order, acc = acc + w_i * x_i from acc = 0 (products and
    sums rounded separately); out = f32(base) + acc * c with a base, else acc * c;
    rounded once (nearest-even) to out_dtype (default: tensors[0].dtype).

    w_i = fp32(weights[i]) (default 1). c = lam / sum(weights) with normalize,
    else lam, computed in Python floats (float64, over the unrounded weights) and
    then rounded once to fp32. normalize with sum(weights) == 0 is a ValueError.
    """
    kernels = lib()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("weighted_sum: at least one model tensor is needed")
    for i, t in enumerate(tensors):
        check_cpu(t, f"model {i}")
    if base is not None:
        check_cpu(base, "base")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"model {i}: shape {tuple(t.shape)} != {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ValueError(f"base: shape {tuple(base.shape)} != {tuple(shape)}")
    in_tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    base_tag = tag(base, "base") if base is not None else 0
    out_dtype = tensors[0].dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")

    w = weights_list(weights, n)
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError("weighted_sum: normalize=True needs weights with a nonzero sum")
        c = float(lam) / total
    else:
        c = float(lam)
    w32 = [fp32(x) for x in w]
    c32 = fp32(c)

    out = empty(shape, dtype=out_dtype)
    numel = out.numel()
    if numel == 0:
        return out
    # Keep the contiguous copies alive until the kernel has returned.
    inputs = [t.detach().contiguous() for t in tensors]
    base_c = base.detach().contiguous() if base is not None else None
    kernels.weighted_sum(
        out.data_ptr(),
        DTYPE_TAGS[out_dtype],
        [t.data_ptr() for t in inputs],
        in_tags,
        base_c.data_ptr() if base_c is not None else 0,
        base_tag,
        numel,
        w32,
        c32,
    )
    return out
