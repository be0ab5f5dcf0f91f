"""TIES-Merging on the CPU (csrc/cpu/ties.cpp): per tensor, and the model-scope passes.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.ties, whose docstrings give the exact fp32 op order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import ties_args
from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, fp32, lib
from pymerge.backends.cpu._sparse import buffers
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype
from pymerge.ops.reference.ties import MODEL_MERGE, _check_choice

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


def _thresholds32(thresholds, n: int) -> list[float]:
    th = per_model(thresholds, n, "thresholds")
    for t in th:
        if not t >= 0.0:
            raise ValueError(f"thresholds must be >= 0, got {t}")
    return [fp32(t) for t in th]


def _model_scope_buffers(base, tensors, thresholds):
    if base is None:
        raise ValueError("model-scope TIES needs a base tensor")
    tensors = list(tensors)
    check_inputs(tensors, base)
    th32 = _thresholds32(thresholds, len(tensors))
    return tensors, th32, buffers(base, tensors)


def ties_sign_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds) -> int:
    """sum_p sign(S_p) over this tensor, S = sequential fp32 sum of the thresholded task
    vectors (|tau_i| >= fp32(t_i) kept); see reference.ties.ties_sign_sum."""
    kernels = lib()
    _, th32, bufs = _model_scope_buffers(base, tensors, thresholds)
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
    merge = _check_choice(merge, MODEL_MERGE, "merge")
    if isinstance(fallback_sign, bool) or not isinstance(fallback_sign, int):
        raise ValueError(f"fallback_sign must be an int, got {type(fallback_sign).__name__}")
    tensors, th32, bufs = _model_scope_buffers(base, tensors, thresholds)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    lam32 = fp32(_check_finite_scalar(lam, "lam"))
    out = empty(tensors[0].shape, dtype=out_dtype)
    if bufs.numel == 0:
        return out
    fb = (fallback_sign > 0) - (fallback_sign < 0)
    kernels.ties_merge_model(out.data_ptr(), DTYPE_TAGS[out_dtype], *bufs.args(), th32, fb, lam32, merge == "dis-mean")
    return out
