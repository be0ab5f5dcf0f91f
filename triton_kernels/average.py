"""weighted_sum: the linear / task_arithmetic primitive.

Per element, all fp32, each op rounded on its own (LAUNCH_OPTIONS turns FMA
contraction off), models in order:
    x_i = f32(theta_i) - f32(theta_0)   (with a base; else f32(theta_i))
    acc = +0;  acc = acc + (w_i * x_i)
    out = f32(theta_0) + acc * c        (with a base; else acc * c)
rounded once to the output dtype: the op order of
pymerge.ops.reference.weighted_sum, so the result is the same bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, n_programs, store_rounded

BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _weighted_sum_kernel(
    out_ptr,
    xs,  # tuple of N_MODELS pointers, each its own dtype
    w_ptr,  # fp32 [N_MODELS]
    base_ptr,
    c,  # fp32 scalar
    n_elements,
    N_MODELS: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    if HAS_BASE:
        b = load_f32(base_ptr + offs, mask)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for i in tl.static_range(N_MODELS):
        x = load_f32(xs[i] + offs, mask)
        if HAS_BASE:
            x = x - b
        acc = acc + tl.load(w_ptr + i) * x
    out = acc * c
    if HAS_BASE:
        out = b + out
    store_rounded(out_ptr + offs, out, mask)


def weighted_sum(
    out: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    c: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the weighted sum into `out` (contiguous, fp32/fp16/bf16).

    tensors / base: contiguous, out.numel() elements each, any of the three
    dtypes; weights: fp32 [len(tensors)] on out's device; c: a Python float
    that is already an fp32 value.
    """
    n = out.numel()
    if n == 0:
        return out
    xs = tuple(kernel_view(t) for t in tensors)
    grid = (n_programs(n, BLOCK_SIZE),)
    with device_guard(out):
        _weighted_sum_kernel[grid](
            kernel_view(out),
            xs,
            weights,
            kernel_view(base) if base is not None else None,
            c,
            n,
            N_MODELS=len(xs),
            HAS_BASE=base is not None,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
