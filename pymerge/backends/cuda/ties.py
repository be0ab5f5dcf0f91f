"""TIES-Merging on the GPU (csrc/cuda/ties.cu): per tensor, and the model-scope passes.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.ties, whose docstrings give the exact fp32 op order.
Kernels run on torch's current stream; ties_sign_sum waits for its result.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends._args import model_scope_args, ties_args, ties_model_args
from pymerge.backends.cuda._lib import (
    DTYPE_TAGS,
    check_models,
    contiguous,
    lib,
    on_device,
    same_device,
    stream,
    tag,
)

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


def ties_sign_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], thresholds) -> int:
    """sum_p sign(S_p) over this tensor, S = sequential fp32 sum of the thresholded task
    vectors (|tau_i| >= fp32(t_i) kept); see reference.ties.ties_sign_sum. Waits for the
    current stream (the count comes back to the host)."""
    kernels = lib()
    tensors, th32 = model_scope_args(base, tensors, thresholds)
    bufs = _Buffers(base, tensors)
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
    a = ties_model_args(base, tensors, thresholds, fallback_sign, lam=lam, merge=merge, out_dtype=out_dtype)
    bufs = _Buffers(base, a.tensors)
    out = torch.empty(a.tensors[0].shape, dtype=a.out_dtype, device=bufs.device)
    if bufs.numel == 0:
        return out
    with on_device(bufs.device):
        kernels.ties_merge_model(
            out.data_ptr(),
            DTYPE_TAGS[a.out_dtype],
            *bufs.args(),
            a.thresholds,
            a.fallback,
            a.lam,
            a.dis_mean,
            stream(bufs.device),
        )
    return out
