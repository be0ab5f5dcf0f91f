"""EMR-Merging on the GPU (csrc/cuda/emr.cu): elect, reconstruct, bit packing.

Same signatures and results as pymerge.ops.reference.emr (and the cpu backend):
u, the masks and the reconstruction bit for bit; the fp64 sums within a few
fp64 ulps (fixed-order reduction, see `emr_elect`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.cuda._lib import (
    check_cuda,
    check_models,
    contiguous,
    fp32,
    lib,
    on_device,
    out_tag,
    same_device,
    stream,
    tag,
)
from pymerge.ops.reference.emr import ZERO_SIGNS, EmrElect, check_pack_bits, check_reconstruct_shapes, check_unpack_bits, n_words

__all__ = ["emr_elect", "emr_reconstruct", "pack_bits", "unpack_bits"]


def emr_elect(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    zero_sign: str = "neg",
    out_dtype: torch.dtype | None = None,
) -> EmrElect:
    """Elect u and the per-model bit-planes of one tensor in one pass (see the reference).

    u (rounded once to out_dtype, default base.dtype) and the masks equal the
    reference bit for bit. abs_tau_sum / abs_masked_u_sum (fp64, on the device)
    are sums of the same fp32 terms in a fixed order that depends on numel only
    (per-thread slots, a fixed tree per block, block partials added in order
    with compensation); they differ from torch's own fp64 order by a few fp64
    ulps at most (relative 1e-13 is a safe bound).
    """
    kernels = lib()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("emr_elect: at least one model tensor is needed")
    if zero_sign not in ZERO_SIGNS:
        raise ValueError(f"zero_sign must be one of {ZERO_SIGNS}, got {zero_sign!r}")
    device = same_device([("base", base)] + [(f"model {i}", t) for i, t in enumerate(tensors)])
    check_models(n)
    base_tag = tag(base, "base")
    in_tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    for i, t in enumerate(tensors):
        if t.shape != base.shape:
            raise ValueError(f"model {i}: shape {tuple(t.shape)} != {tuple(base.shape)}")
    out_dtype = base.dtype if out_dtype is None else out_dtype
    u_tag = out_tag(out_dtype)

    numel = base.numel()
    u = torch.empty(base.shape, dtype=out_dtype, device=device)
    masks = torch.empty((n, n_words(numel)), dtype=torch.int32, device=device)
    sums = torch.zeros(2 * n, dtype=torch.float64, device=device)
    if numel > 0:
        base_c = contiguous(base)
        inputs = [contiguous(t) for t in tensors]
        partials = torch.empty((kernels.emr_elect_blocks(numel), 2 * n), dtype=torch.float64, device=device)
        with on_device(device):
            kernels.emr_elect(
                base_c.data_ptr(), base_tag, [t.data_ptr() for t in inputs], in_tags, numel,
                zero_sign == "zero", u.data_ptr(), u_tag, masks.data_ptr(), partials.data_ptr(), sums.data_ptr(),
                stream(device),
            )
    return EmrElect(u=u, masks=masks, abs_tau_sum=sums[:n], abs_masked_u_sum=sums[n:], numel=numel)


def emr_reconstruct(
    base: torch.Tensor,
    u: torch.Tensor,
    mask_words: torch.Tensor,
    lam: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """theta_0 + lam * M ⊙ u in one fused pass, bit for bit as the reference.

    Per element in fp32: out = f32(base) + (M ? f32(lam) * f32(u) : +0), one
    rounding to out_dtype (default base.dtype).
    """
    kernels = lib()
    device = same_device([("base", base), ("u", u), ("mask_words", mask_words)])
    base_tag = tag(base, "emr_reconstruct: base")
    u_tag = tag(u, "emr_reconstruct: u")
    numel = check_reconstruct_shapes(base, u, mask_words)
    out_dtype = base.dtype if out_dtype is None else out_dtype
    o_tag = out_tag(out_dtype)
    lam32 = fp32(lam)

    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    if numel == 0:
        return out
    base_c = contiguous(base)
    u_c = contiguous(u)
    words_c = contiguous(mask_words)
    with on_device(device):
        kernels.emr_reconstruct(out.data_ptr(), o_tag, base_c.data_ptr(), base_tag, u_c.data_ptr(), u_tag,
                                words_c.data_ptr(), numel, lam32, stream(device))
    return out


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask [..., n] into int32 words [..., ceil(n/32)] (the reference's layout)."""
    kernels = lib()
    check_cuda(mask, "mask")
    n, lead = check_pack_bits(mask)
    words = torch.empty(*lead, n_words(n), dtype=torch.int32, device=mask.device)
    if words.numel() == 0:
        return words
    m = contiguous(mask)
    with on_device(mask.device):
        kernels.pack_bits(m.data_ptr(), m.numel() // n, n, words.data_ptr(), stream(mask.device))
    return words


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 words [..., ceil(n/32)] -> bool [..., n]."""
    kernels = lib()
    check_cuda(words, "words")
    n, lead = check_unpack_bits(words, n)
    out = torch.empty(*lead, n, dtype=torch.bool, device=words.device)
    if out.numel() == 0:
        return out
    w = contiguous(words)
    with on_device(words.device):
        kernels.unpack_bits(w.data_ptr(), out.numel() // n, n, out.data_ptr(), stream(words.device))
    return out
