"""weighted_sum on the GPU (csrc/cuda/average.cu): linear and task_arithmetic."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.cuda._lib import (
    check_models,
    contiguous,
    fp32,
    lib,
    on_device,
    out_tag,
    same_device,
    stream,
    tag,
    weights_list,
)

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
    """c * sum_i w_i * x_i (+ base): the cpu backend's contract, bit for bit as the reference.

    x_i = f32(tensors[i]) - f32(base) with a base, else f32(tensors[i]); acc = +0,
    acc = acc + w_i * x_i in model order (separately rounded fp32 ops);
    out = f32(base) + acc * c with a base, else acc * c; one rounding to out_dtype
    (default tensors[0].dtype). w_i = fp32(weights[i]); c = fp32(lam / sum(weights))
    with normalize (sum in float64), else fp32(lam).
    """
    kernels = lib()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("weighted_sum: at least one model tensor is needed")
    device = same_device([(f"model {i}", t) for i, t in enumerate(tensors)] + [("base", base)])
    check_models(n)
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"model {i}: shape {tuple(t.shape)} != {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ValueError(f"base: shape {tuple(base.shape)} != {tuple(shape)}")
    in_tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    base_tag = tag(base, "base") if base is not None else 0
    out_dtype = tensors[0].dtype if out_dtype is None else out_dtype
    o_tag = out_tag(out_dtype)

    w = weights_list(weights, n)
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError("weighted_sum: normalize=True needs weights with a nonzero sum")
        c = float(lam) / total
    else:
        c = float(lam)

    out = torch.empty(shape, dtype=out_dtype, device=device)
    numel = out.numel()
    if numel == 0:
        return out
    inputs = [contiguous(t) for t in tensors]
    base_c = contiguous(base) if base is not None else None
    with on_device(device):
        kernels.weighted_sum(
            out.data_ptr(),
            o_tag,
            [t.data_ptr() for t in inputs],
            in_tags,
            base_c.data_ptr() if base_c is not None else 0,
            base_tag,
            numel,
            [fp32(x) for x in w],
            fp32(c),
            stream(device),
        )
    return out
