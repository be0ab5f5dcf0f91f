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
from pymerge.backends._args import pcb_args
from pymerge.ops.reference._common import check_inputs
from pymerge.ops.reference.pcb import DEN_MIN, _as_f32_vector

__all__ = ["pcb_scores", "pcb_merge_with_stats", "pcb_merge"]

def _prepare(base, tensors, what: str):
    """Reference checks plus the device check; returns (flat base, flat inputs, device)."""
    if base is None:
        raise TypeError(f"{what}: a base tensor is required")
    tensors = list(tensors)
    check_inputs(tensors, base)
    device = check_device(tensors + [base])
    return flat(base), [flat(t) for t in tensors], device


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
    a = pcb_args(base, n, lam=lam, lambdas=lambdas, out_dtype=out_dtype)
    stats = [_as_f32_vector(v, n, name, device).contiguous() for v, name in ((lo, "lo"), (hi, "hi"), (q, "q"), (M, "M"))]
    out = torch.empty(base.shape, dtype=a.kernel_dtype, device=device)
    if out.numel():
        k.pcb.merge_with_stats(out.view(-1), b, xs, *stats, a.lam, _lambdas(a.lambdas, device), fp32(DEN_MIN))
    return a.finish(out)


def _pcb_merge(base, tensors, density, clip_ratio, lam, lambdas, out_dtype):
    """(output, (lo, hi, q, M) as fp32 [N] tensors, or None for an empty tensor); the
    statistics are for tests."""
    k = kernels()
    b, xs, device = _prepare(base, tensors, "pcb_merge")
    a = pcb_args(base, len(xs), lam=lam, lambdas=lambdas, out_dtype=out_dtype, density=density,
                 clip_ratio=clip_ratio)
    out = torch.empty(base.shape, dtype=a.kernel_dtype, device=device)
    stats = None
    if b.numel():
        stats = k.pcb.merge_tensor(out.view(-1), b, xs, a.i_lo, a.i_hi, a.k_q, a.lam, _lambdas(a.lambdas, device),
                                   fp32(DEN_MIN))
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
    scores, exact quantile q_i and max M_i of beta_i, then the merge; no sort."""
    return _pcb_merge(base, tensors, density, clip_ratio, lam, lambdas, out_dtype)[0]
