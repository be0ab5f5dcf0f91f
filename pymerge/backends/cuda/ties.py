"""TIES-Merging on the GPU (csrc/cuda/ties.cu): per tensor, and the model-scope passes.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.ties, whose docstrings give the exact fp32 op order.
Kernels run on torch's current stream; ties_sign_sum waits for its result.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import ties_args
from pymerge.backends.cuda._lib import (
    DTYPE_TAGS,
    check_models,
    contiguous,
    fp32,
    lib,
    on_device,
    same_device,
    stream,
    tag,
)
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype
from pymerge.ops.reference.ties import MODEL_MERGE, _check_choice

__all__ = ["ties_merge", "ties_sign_sum", "ties_merge_model"]


class _Buffers:
    """Contiguous device copies of one tensor's base and models, with the kernel arguments.

    Holds the tensors, so the addresses stay valid while the object lives.
    """

    def __init__(self, base: torch.Tensor, tensors: Sequence[torch.Tensor]):
        tensors = list(tensors)
        self.device = same_device([("base", base)] + [(f"model {i}", t) for i, t in enumerate(tensors)])
        check_models(len(tensors))
        self.tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
        self.base_tag = tag(base, "base")
        self.base = contiguous(base)
        self.models = [contiguous(t) for t in tensors]

    @property
    def numel(self) -> int:
        return self.base.numel()

    def args(self) -> tuple:
        """(in_ptrs, in_dtypes, base_ptr, base_dtype, numel), the kernels' input arguments."""
        return [t.data_ptr() for t in self.models], self.tags, self.base.data_ptr(), self.base_tag, self.numel


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
    largest), found by radix selection on the GPU; then weight, elect, disjoint merge,
    normalize, lambda and + base in one fused pass, rounded once to out_dtype (default
    tensors[0].dtype).
    """
    kernels = lib()
    a = ties_args(base, tensors, weights, densities, lam=lam, normalize=normalize, consensus=consensus,
                  trim_ties=trim_ties, out_dtype=out_dtype)
    bufs = _Buffers(base, a.tensors)
    out = torch.empty(a.tensors[0].shape, dtype=a.out_dtype, device=bufs.device)
    if out.numel() == 0:
        return out
    with on_device(bufs.device):
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
            stream(bufs.device),
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
    return tensors, th32, _Buffers(base, tensors)


def ties_sign_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds) -> int:
    """sum_p sign(S_p) over this tensor, S = sequential fp32 sum of the thresholded task
    vectors (|tau_i| >= fp32(t_i) kept); see reference.ties.ties_sign_sum. Waits for the
    current stream (the count comes back to the host)."""
    kernels = lib()
    _, th32, bufs = _model_scope_buffers(base, tensors, thresholds)
    if bufs.numel == 0:
        return 0
    with on_device(bufs.device):
        return int(kernels.ties_sign_sum(*bufs.args(), th32, stream(bufs.device)))


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
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=bufs.device)
    if bufs.numel == 0:
        return out
    fb = (fallback_sign > 0) - (fallback_sign < 0)
    with on_device(bufs.device):
        kernels.ties_merge_model(
            out.data_ptr(),
            DTYPE_TAGS[out_dtype],
            *bufs.args(),
            th32,
            fb,
            lam32,
            merge == "dis-mean",
            stream(bufs.device),
        )
    return out
