"""TIES-Merging with the Triton kernels (triton_kernels/ties.py): per tensor, and the model-scope passes.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.ties, whose docstrings give the exact fp32 op order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import model_scope_args, ties_args, ties_model_args
from pymerge.backends.triton._lib import check_device, flat, fp32_tensor, kernels

__all__ = ["ties_merge", "ties_sign_sum", "ties_merge_model"]


def ties_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights=None,
    densities=1.0,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    trim_ties: str = "exact",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES per tensor (mergekit's form); see reference.ties.ties_merge.

    Per model, the k_i = trim_count(density_i, numel) largest |tau_i| are kept (exactly
    k_i, lower flat index first among equals; "inclusive": every |tau_i| >= the k_i-th
    largest), found by radix selection; then one fused pass: trim, weight, elect,
    disjoint merge, normalize, lambda, + base, one rounding to out_dtype.
    """
    k = kernels()
    a = ties_args(base, tensors, weights, densities, lam=lam, normalize=normalize, consensus=consensus,
                  trim_ties=trim_ties, out_dtype=out_dtype)
    device = check_device(a.tensors + [base])
    out = torch.empty(a.tensors[0].shape, dtype=a.out_dtype, device=device)
    if out.numel() == 0:
        return out
    b = flat(base)
    xs = [flat(t) for t in a.tensors]
    trims = k.histogram.top_k_trims(b, xs, list(enumerate(a.ks)), inclusive=a.inclusive)
    k.ties.trim_merge(
        out.view(-1),
        b,
        xs,
        trims,
        fp32_tensor(a.weights, device),
        a.lam,
        drop=False,
        ties=True,
        count_consensus=a.count_consensus,
        normalize=a.normalize,
    )
    return out


def ties_sign_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds) -> int:
    """sum_p sign(S_p) over this tensor, S = sequential fp32 sum of the thresholded task
    vectors (|tau_i| >= fp32(t_i) kept); see reference.ties.ties_sign_sum."""
    k = kernels()
    tensors, th32 = model_scope_args(base, tensors, thresholds)
    device = check_device(tensors + [base])
    if base.numel() == 0:
        return 0
    return k.ties.sign_sum(flat(base), [flat(t) for t in tensors], fp32_tensor(th32, device))


def ties_merge_model(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    thresholds,
    fallback_sign: int,
    *,
    lam: float = 1.0,
    merge: str = "dis-mean",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The merge pass of model-scope TIES given the thresholds and the model-wide
    fallback sign; see reference.ties.ties_merge_model."""
    k = kernels()
    a = ties_model_args(base, tensors, thresholds, fallback_sign, lam=lam, merge=merge, out_dtype=out_dtype)
    device = check_device(a.tensors + [base])
    out = torch.empty(a.tensors[0].shape, dtype=a.out_dtype, device=device)
    if out.numel() == 0:
        return out
    k.ties.merge_model(out.view(-1), flat(base), [flat(t) for t in a.tensors], fp32_tensor(a.thresholds, device),
                       a.fallback, a.lam, a.dis_mean)
    return out
