"""EMR-Merging on the CPU (csrc/cpu/emr.cpp): elect, reconstruct, bit packing.

Same signatures and results as pymerge.ops.reference.emr: u, the masks and the
reconstruction bit for bit; the fp64 sums within a few fp64 ulps (see
`emr_elect`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, check_cpu, fp32, lib, tag
from pymerge.ops.reference.emr import ZERO_SIGNS, EmrElect, check_pack_bits, check_reconstruct_shapes, check_unpack_bits, n_words

__all__ = ["emr_elect", "emr_reconstruct", "pack_bits", "unpack_bits"]


def _out_tag(out_dtype: torch.dtype) -> int:
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    return DTYPE_TAGS[out_dtype]


def emr_elect(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    zero_sign: str = "neg",
    out_dtype: torch.dtype | None = None,
) -> EmrElect:
    """Elect u and the per-model bit-planes of one tensor in one pass (see the reference).

    u (rounded once to out_dtype, default base.dtype) and the masks equal the
    reference bit for bit. abs_tau_sum / abs_masked_u_sum are fp64 sums of the
    same fp32 terms in a fixed order (lanes per block, blocks added with
    compensation), independent of the thread count; they differ from torch's
    own fp64 summation order by a few fp64 ulps at most (relative 1e-13 is a
    safe bound).
    """
    kernels = lib()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("emr_elect: at least one model tensor is needed")
    if zero_sign not in ZERO_SIGNS:
        raise ValueError(f"zero_sign must be one of {ZERO_SIGNS}, got {zero_sign!r}")
    check_cpu(base, "base")
    for i, t in enumerate(tensors):
        check_cpu(t, f"model {i}")
    base_tag = tag(base, "base")
    in_tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    for i, t in enumerate(tensors):
        if t.shape != base.shape:
            raise ValueError(f"model {i}: shape {tuple(t.shape)} != {tuple(base.shape)}")
    out_dtype = base.dtype if out_dtype is None else out_dtype
    u_tag = _out_tag(out_dtype)

    numel = base.numel()
    u = empty(base.shape, dtype=out_dtype)
    masks = empty((n, n_words(numel)), dtype=torch.int32)
    abs_tau = torch.zeros(n, dtype=torch.float64)
    abs_u = torch.zeros(n, dtype=torch.float64)
    if numel > 0:
        # Keep the contiguous copies alive until the kernel has returned.
        base_c = base.detach().contiguous()
        inputs = [t.detach().contiguous() for t in tensors]
        kernels.emr_elect(
            base_c.data_ptr(), base_tag, [t.data_ptr() for t in inputs], in_tags, numel,
            zero_sign == "zero", u.data_ptr(), u_tag, masks.data_ptr(), abs_tau.data_ptr(), abs_u.data_ptr(),
        )
    return EmrElect(u=u, masks=masks, abs_tau_sum=abs_tau, abs_masked_u_sum=abs_u, numel=numel)


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
    check_cpu(base, "base")
    check_cpu(u, "u")
    check_cpu(mask_words, "mask_words")
    base_tag = tag(base, "emr_reconstruct: base")
    u_tag = tag(u, "emr_reconstruct: u")
    numel = check_reconstruct_shapes(base, u, mask_words)
    out_dtype = base.dtype if out_dtype is None else out_dtype
    out_tag = _out_tag(out_dtype)
    lam32 = fp32(lam)

    out = empty(base.shape, dtype=out_dtype)
    if numel == 0:
        return out
    base_c = base.detach().contiguous()
    u_c = u.detach().contiguous()
    words_c = mask_words.detach().contiguous()
    kernels.emr_reconstruct(out.data_ptr(), out_tag, base_c.data_ptr(), base_tag, u_c.data_ptr(), u_tag,
                            words_c.data_ptr(), numel, lam32)
    return out


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask [..., n] into int32 words [..., ceil(n/32)] (the reference's layout)."""
    kernels = lib()
    check_cpu(mask, "mask")
    n, lead = check_pack_bits(mask)
    words = empty((*lead, n_words(n)), dtype=torch.int32)
    if words.numel() == 0:
        return words
    m = mask.detach().contiguous()
    kernels.pack_bits(m.data_ptr(), m.numel() // n, n, words.data_ptr())
    return words


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 words [..., ceil(n/32)] -> bool [..., n]."""
    kernels = lib()
    check_cpu(words, "words")
    n, lead = check_unpack_bits(words, n)
    out = empty((*lead, n), dtype=torch.bool)
    if out.numel() == 0:
        return out
    w = words.detach().contiguous()
    kernels.unpack_bits(w.data_ptr(), out.numel() // n, n, out.data_ptr())
    return out
