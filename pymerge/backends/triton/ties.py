"""TIES-Merging with the Triton kernels (triton_kernels/ties.py): per tensor, and the model-scope passes.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.ties, whose docstrings give the exact fp32 op order.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import ties_args
from pymerge.backends.triton._lib import check_device, flat, fp32, fp32_tensor, kernels
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


def _model_scope_inputs(base, tensors, thresholds):
    if base is None:
        raise ValueError("model-scope TIES needs a base tensor")
    tensors = list(tensors)
    check_inputs(tensors, base)
    th = per_model(thresholds, len(tensors), "thresholds")
    for t in th:
        if not t >= 0.0:
            raise ValueError(f"thresholds must be >= 0, got {t}")
    device = check_device(tensors + [base])
    return tensors, fp32_tensor(th, device), device


def ties_sign_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds) -> int:
    """sum_p sign(S_p) over this tensor, S = sequential fp32 sum of the thresholded task
    vectors (|tau_i| >= fp32(t_i) kept); see reference.ties.ties_sign_sum."""
    k = kernels()
    tensors, th, _ = _model_scope_inputs(base, tensors, thresholds)
    if base.numel() == 0:
        return 0
    return k.ties.sign_sum(flat(base), [flat(t) for t in tensors], th)


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
    merge = _check_choice(merge, MODEL_MERGE, "merge")
    if isinstance(fallback_sign, bool) or not isinstance(fallback_sign, int):
        raise ValueError(f"fallback_sign must be an int, got {type(fallback_sign).__name__}")
    tensors, th, device = _model_scope_inputs(base, tensors, thresholds)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    lam32 = fp32(_check_finite_scalar(lam, "lam"))
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    fb = (fallback_sign > 0) - (fallback_sign < 0)
    k.ties.merge_model(out.view(-1), flat(base), [flat(t) for t in tensors], th, fb, lam32, merge == "dis-mean")
    return out
