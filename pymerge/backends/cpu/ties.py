"""TIES-Merging on the CPU (csrc/cpu/ties.cpp): per tensor, and the model-scope passes.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.ties, whose docstrings give the exact fp32 op order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import model_scope_args, ties_args, ties_model_args
from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, lib
from pymerge.backends.cpu._sparse import buffers

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

    Per model, k_i = trim_count(density_i, numel) largest |tau_i| are kept (exactly k_i,
    lower flat index first among equals; "inclusive": every |tau_i| >= the k_i-th
    largest); then weight, elect, disjoint merge, normalize, lambda and + base in one
    fused pass, rounded once to out_dtype (default tensors[0].dtype).
    """
    kernels = lib()
    a = ties_args(base, tensors, weights, densities, lam=lam, normalize=normalize, consensus=consensus,
                  trim_ties=trim_ties, out_dtype=out_dtype)
    bufs = buffers(base, a.tensors)
    out = empty(a.tensors[0].shape, dtype=a.out_dtype)
    if out.numel() == 0:
        return out
    kernels.ties_merge(
        out.data_ptr(),
        DTYPE_TAGS[a.out_dtype],
        *bufs.args(),
        a.ks,
        a.weights,
        a.lam,
        a.normalize,
        a.count_consensus,
        a.inclusive,
    )
    return out


def ties_sign_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds) -> int:
    """sum_p sign(S_p) over this tensor, S = sequential fp32 sum of the thresholded task
    vectors (|tau_i| >= fp32(t_i) kept); see reference.ties.ties_sign_sum."""
    kernels = lib()
    tensors, th32 = model_scope_args(base, tensors, thresholds)
    bufs = buffers(base, tensors)
    if bufs.numel == 0:
        return 0
    return int(kernels.ties_sign_sum(*bufs.args(), th32))


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
    kernels = lib()
    a = ties_model_args(base, tensors, thresholds, fallback_sign, lam=lam, merge=merge, out_dtype=out_dtype)
    bufs = buffers(base, a.tensors)
    out = empty(a.tensors[0].shape, dtype=a.out_dtype)
    if bufs.numel == 0:
        return out
    kernels.ties_merge_model(out.data_ptr(), DTYPE_TAGS[a.out_dtype], *bufs.args(), a.thresholds, a.fallback, a.lam,
                             a.dis_mean)
    return out
