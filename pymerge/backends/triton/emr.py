"""EMR-Merging with the Triton kernels (triton_kernels/emr.py): elect and reconstruct."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.triton._lib import check_device, flat, fp32, kernels
from pymerge.ops.reference._common import FLOAT_DTYPES, check_inputs, resolve_out_dtype
from pymerge.ops.reference.average import _check_out_dtype
from pymerge.ops.reference.emr import EmrElect, _check_zero_sign, check_reconstruct_shapes, n_words

__all__ = ["emr_elect", "emr_reconstruct"]


def emr_elect(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    zero_sign: str = "neg",
    out_dtype: torch.dtype | None = None,
) -> EmrElect:
    """Same contract as pymerge.ops.reference.emr_elect (out_dtype: fp32, fp16 or bf16).

    u and masks are bit-identical to the reference; the two fp64 sums agree with it to a
    relative ~1e-12 (summation order), see triton_kernels/emr.py.
    """
    k = kernels()
    tensors = list(tensors)
    check_inputs(tensors, base)
    _check_zero_sign(zero_sign)
    device = check_device(tensors + [base])
    out_dtype = _check_out_dtype(resolve_out_dtype([base], out_dtype))
    numel = base.numel()
    u = torch.empty(base.shape, dtype=out_dtype, device=device)
    words = torch.zeros((len(tensors), n_words(numel)), dtype=torch.int32, device=device)
    abs_tau_sum, abs_masked_u_sum = k.emr.elect(
        u.view(-1), words, flat(base), [flat(t) for t in tensors], zero_sign=zero_sign == "zero"
    )
    return EmrElect(u=u, masks=words, abs_tau_sum=abs_tau_sum, abs_masked_u_sum=abs_masked_u_sum, numel=numel)


def emr_reconstruct(
    base: torch.Tensor,
    u: torch.Tensor,
    mask_words: torch.Tensor,
    lam: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as pymerge.ops.reference.emr_reconstruct (out_dtype: fp32, fp16 or bf16); bit-identical."""
    k = kernels()
    if base.dtype not in FLOAT_DTYPES or u.dtype not in FLOAT_DTYPES:
        raise ValueError(f"emr_reconstruct: dtypes {base.dtype}, {u.dtype} must be fp32, fp16 or bf16")
    check_reconstruct_shapes(base, u, mask_words)
    device = check_device([base, u, mask_words])
    out_dtype = _check_out_dtype(base.dtype if out_dtype is None else out_dtype)
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    k.emr.reconstruct(out.view(-1), flat(base), flat(u), mask_words.contiguous(), fp32(lam))
    return out
