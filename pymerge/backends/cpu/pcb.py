"""PCB-Merging on the CPU (csrc/cpu/pcb.cpp): scores, merge given the statistics, per-tensor merge.

Same signatures, validation and fp32 op order as pymerge/ops/reference/pcb.py.
exp and tanh are the correctly rounded fp32 values (computed in double and
rounded once); torch's fp32 exp/tanh are within 1 ulp of those, so the scores
beta may differ from the reference in their last bit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.hostmem import empty
from pymerge.backends._args import pcb_args
from pymerge.backends.cpu._lib import DTYPE_TAGS, check_cpu, lib, tag
from pymerge.ops.reference._common import check_inputs
from pymerge.ops.reference.pcb import _as_f32_vector

__all__ = ["pcb_scores", "pcb_merge_with_stats", "pcb_merge"]


def _prepare(base, tensors, what: str):
    """Reference checks plus the cpu ones; returns (contiguous base, contiguous inputs, tags)."""
    if base is None:
        raise TypeError(f"{what}: a base tensor is required")
    tensors = list(tensors)
    check_inputs(tensors, base)
    check_cpu(base, "base")
    for i, t in enumerate(tensors):
        check_cpu(t, f"model {i}")
    # Keep the contiguous copies alive until the kernel has returned.
    base_c = base.detach().contiguous()
    inputs = [t.detach().contiguous() for t in tensors]
    in_tags = [tag(t, f"model {i}") for i, t in enumerate(inputs)]
    return base_c, inputs, in_tags


def _f32_list(x, n: int, name: str) -> list[float]:
    return _as_f32_vector(x, n, name, torch.device("cpu")).tolist()


def pcb_scores(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    lo: torch.Tensor | Sequence[float],
    hi: torch.Tensor | Sequence[float],
) -> torch.Tensor:
    """Scores beta fp32 [N, numel] of one tensor given the clip bounds (reference: `pcb_scores`)."""
    kernels = lib()
    base_c, inputs, in_tags = _prepare(base, tensors, "pcb_scores")
    n = len(inputs)
    lo_l, hi_l = _f32_list(lo, n, "lo"), _f32_list(hi, n, "hi")
    numel = base_c.numel()
    out = empty((n, numel), dtype=torch.float32)
    if numel:
        kernels.pcb_scores(
            out.data_ptr(), [t.data_ptr() for t in inputs], in_tags, base_c.data_ptr(), tag(base_c, "base"), numel, lo_l, hi_l
        )
    return out


def pcb_merge_with_stats(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    lo,
    hi,
    q,
    M,
    *,
    lam: float = 1.0,
    lambdas: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor given lo, hi, q, M in one fused pass (reference: `pcb_merge_with_stats`)."""
    kernels = lib()
    base_c, inputs, in_tags = _prepare(base, tensors, "pcb_merge_with_stats")
    n = len(inputs)
    a = pcb_args(base, n, lam=lam, lambdas=lambdas, out_dtype=out_dtype)
    stats = [_f32_list(v, n, name) for v, name in ((lo, "lo"), (hi, "hi"), (q, "q"), (M, "M"))]
    out = empty(base.shape, dtype=a.kernel_dtype)
    numel = out.numel()
    if numel:
        kernels.pcb_merge_with_stats(
            out.data_ptr(),
            DTYPE_TAGS[out.dtype],
            [t.data_ptr() for t in inputs],
            in_tags,
            base_c.data_ptr(),
            tag(base_c, "base"),
            numel,
            *stats,
            a.lam,
            a.lambdas or [],
        )
    return a.finish(out)


def _pcb_merge(base, tensors, density, clip_ratio, lam, lambdas, out_dtype):
    """(output, (lo, hi, q, M) as fp32 lists); the statistics are for tests."""
    kernels = lib()
    base_c, inputs, in_tags = _prepare(base, tensors, "pcb_merge")
    a = pcb_args(base, len(inputs), lam=lam, lambdas=lambdas, out_dtype=out_dtype, density=density,
                 clip_ratio=clip_ratio)
    out = empty(base.shape, dtype=a.kernel_dtype)
    stats = kernels.pcb_merge(
        out.data_ptr(),
        DTYPE_TAGS[out.dtype],
        [t.data_ptr() for t in inputs],
        in_tags,
        base_c.data_ptr(),
        tag(base_c, "base"),
        base_c.numel(),
        a.i_lo,
        a.i_hi,
        a.k_q,
        a.lam,
        a.lambdas or [],
    )
    return a.finish(out), stats


def pcb_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    density: float = 0.1,
    clip_ratio: float = 0.01,
    lam: float = 1.0,
    lambdas: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """PCB with per-tensor scope (reference: `pcb_merge`): exact clip quantiles of |tau_i|,
    scores, exact quantile q_i and max M_i of beta_i, then the merge; one call, no sort."""
    return _pcb_merge(base, tensors, density, clip_ratio, lam, lambdas, out_dtype)[0]
