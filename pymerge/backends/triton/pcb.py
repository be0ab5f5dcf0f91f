"""PCB-Merging with the Triton kernels (triton_kernels/pcb.py): scores, merge given the statistics, per-tensor merge.

Same signatures, validation and fp32 op order as pymerge/ops/reference/pcb.py,
and the same bits as the CPU backend: exp and tanh are evaluated exactly as
csrc/cpu/pcb.cpp evaluates them (fp64, rounded once: correctly rounded fp32
values). torch's fp32 exp/tanh (the plain reference) are within 1 ulp of those,
so scores may differ from the plain reference in their last bit; against the
reference run with correctly rounded exp/tanh every result is bit-identical.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.triton._lib import check_device, flat, fp32, fp32_tensor, kernels
from pymerge.ops.reference._common import check_inputs, resolve_out_dtype
from pymerge.ops.reference.pcb import (
    DEN_MIN,
    _as_f32_vector,
    _check_ratio,
    _resolve_lambdas,
    pcb_clip_indices,
    pcb_score_index,
)

__all__ = ["pcb_scores", "pcb_merge_with_stats", "pcb_merge"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prepare(base, tensors, what: str):
    """Reference checks plus the device check; returns (flat base, flat inputs, device)."""
    if base is None:
        raise TypeError(f"{what}: a base tensor is required")
    tensors = list(tensors)
    check_inputs(tensors, base)
    device = check_device(tensors + [base])
    return flat(base), [flat(t) for t in tensors], device


def _out_buffer(shape, out_dtype: torch.dtype, device) -> torch.Tensor:
    # Dtypes the kernels do not store (float64, ...) get the fp32 result cast once,
    # as the reference's final .to(out_dtype).
    return torch.empty(shape, dtype=out_dtype if out_dtype in _KERNEL_DTYPES else torch.float32, device=device)


def _finish(out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _lambdas(lambdas, device) -> torch.Tensor | None:
    return None if lambdas is None else fp32_tensor(lambdas, device)


def pcb_scores(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    lo: torch.Tensor | Sequence[float],
    hi: torch.Tensor | Sequence[float],
) -> torch.Tensor:
    """Scores beta fp32 [N, numel] of one tensor given the clip bounds (reference: `pcb_scores`)."""
    k = kernels()
    b, xs, device = _prepare(base, tensors, "pcb_scores")
    n = len(xs)
    lo_t, hi_t = (_as_f32_vector(v, n, name, device).contiguous() for v, name in ((lo, "lo"), (hi, "hi")))
    numel = b.numel()
    out = torch.empty((n, numel), dtype=torch.float32, device=device)
    if numel:
        k.pcb.scores(out, b, xs, lo_t, hi_t)
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
    k = kernels()
    b, xs, device = _prepare(base, tensors, "pcb_merge_with_stats")
    n = len(xs)
    lambdas = _resolve_lambdas(lam, lambdas, n)
    out_dtype = resolve_out_dtype([base], out_dtype)
    stats = [_as_f32_vector(v, n, name, device).contiguous() for v, name in ((lo, "lo"), (hi, "hi"), (q, "q"), (M, "M"))]
    out = _out_buffer(base.shape, out_dtype, device)
    if out.numel():
        k.pcb.merge_with_stats(out.view(-1), b, xs, *stats, fp32(lam), _lambdas(lambdas, device), fp32(DEN_MIN))
    return _finish(out, out_dtype)


def _pcb_merge(base, tensors, density, clip_ratio, lam, lambdas, out_dtype):
    """(output, (lo, hi, q, M) as fp32 [N] tensors, or None for an empty tensor); the
    statistics are for tests."""
    k = kernels()
    b, xs, device = _prepare(base, tensors, "pcb_merge")
    n = len(xs)
    _check_ratio(density, "density")
    lambdas = _resolve_lambdas(lam, lambdas, n)
    out_dtype = resolve_out_dtype([base], out_dtype)
    numel = b.numel()
    i_lo, i_hi = pcb_clip_indices(numel, clip_ratio)
    k_q = pcb_score_index(numel, density)
    out = _out_buffer(base.shape, out_dtype, device)
    stats = None
    if numel:
        stats = k.pcb.merge_tensor(out.view(-1), b, xs, i_lo, i_hi, k_q, fp32(lam), _lambdas(lambdas, device), fp32(DEN_MIN))
    return _finish(out, out_dtype), stats


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
    scores, exact quantile q_i and max M_i of beta_i, then the merge; no sort."""
    return _pcb_merge(base, tensors, density, clip_ratio, lam, lambdas, out_dtype)[0]
