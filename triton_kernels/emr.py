"""EMR-Merging: elect (u, bit-packed masks, rescaler sums) in one pass, and the fused reconstruction.

Elect, per element, fp32, models in order (pymerge.ops.reference.emr_elect):
    tau_i = f32(theta_i) - f32(theta_0);  s = ((+0 + tau_0) + tau_1) + ...
    g = +1 if s > 0 else -1   (ZERO_SIGN: 0 where s == 0)
    a_i = (g * tau_i) > 0;    u = g * max(+0, max over a_i of |tau_i|)
u, and so the masks, are bit-identical to the reference. Masks are bit-planes:
element 32w + j of the tensor is bit j of word w (int32 storage), one plane
per model; the last word is zero-padded because lanes past the end read
tau = 0, which never agrees. The rescaler statistics sum |tau_i| and
sum a_i |u| in fp64: one partial per block, then reduce.sum_rows in a fixed
order. The reference sums in an unspecified fp64 order: every term is exact,
only the order differs, so the two agree to a relative
~(28 + numel / 2^20) * 2^-52 (below 1e-13 up to 2^28 elements).

Reconstruct: out = f32(theta_0) + (M ? f32(lam) * f32(u) : +0), bit-identical.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, n_programs, store_rounded
from .reduce import sum_rows

# A multiple of 32: each block writes whole mask words.
BLOCK_SIZE = 1024
NUM_WARPS = 4
BITS_PER_WORD = 32


@triton.jit
def _emr_elect_kernel(
    u_ptr,
    words_ptr,  # int32 [N_MODELS, n_words]
    partials_ptr,  # fp64 [2 * N_MODELS, n_blocks]: rows 2i (|tau_i|) and 2i + 1 (a_i |u|)
    base_ptr,
    xs,
    n_elements,
    n_words,
    n_blocks,
    N_MODELS: tl.constexpr,
    ZERO_SIGN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    taus = ()
    s = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for i in tl.static_range(N_MODELS):
        tau = load_f32(xs[i] + offs, mask) - b
        taus = taus + (tau,)
        s = s + tau
    if ZERO_SIGN:
        g = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    else:
        g = tl.where(s > 0, 1.0, -1.0)
    e = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for i in tl.static_range(N_MODELS):
        e = tl.maximum(e, tl.where((g * taus[i]) > 0, tl.abs(taus[i]), 0.0))
    u = g * e
    store_rounded(u_ptr + offs, u, mask)

    WORDS_PER_BLOCK: tl.constexpr = BLOCK_SIZE // 32
    word_idx = pid.to(tl.int64) * WORDS_PER_BLOCK + tl.arange(0, WORDS_PER_BLOCK)
    bit = tl.arange(0, 32).to(tl.uint32)
    abs_u = tl.abs(u)
    for i in tl.static_range(N_MODELS):
        agree = (g * taus[i]) > 0
        lanes = tl.reshape(agree.to(tl.uint32), [WORDS_PER_BLOCK, 32])
        words = tl.sum(lanes << bit[None, :], axis=1)  # distinct bits: the sum is the OR
        tl.store(words_ptr + i * n_words + word_idx, words.to(tl.int32, bitcast=True), mask=word_idx < n_words)
        tau_sum = tl.sum(tl.abs(taus[i]).to(tl.float64), axis=0)
        u_sum = tl.sum(tl.where(agree, abs_u, 0.0).to(tl.float64), axis=0)
        tl.store(partials_ptr + (2 * i) * n_blocks + pid, tau_sum)
        tl.store(partials_ptr + (2 * i + 1) * n_blocks + pid, u_sum)


@triton.jit
def _emr_reconstruct_kernel(out_ptr, base_ptr, u_ptr, words_ptr, lam, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    word = tl.load(words_ptr + offs // 32, mask=mask, other=0)
    bit = ((word >> (offs % 32).to(tl.int32)) & 1) != 0
    b = load_f32(base_ptr + offs, mask)
    u = load_f32(u_ptr + offs, mask)
    out = b + tl.where(bit, lam * u, 0.0)
    store_rounded(out_ptr + offs, out, mask)


def elect(
    u: torch.Tensor, words: torch.Tensor, base: torch.Tensor, tensors: Sequence[torch.Tensor], *, zero_sign: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write u (contiguous, n elements) and words (int32 [N, ceil(n/32)]); return the fp64 [N] sums.

    Returns (sum_p |tau_i,p|, sum_p a_i,p |u_p|) per model i, u before its rounding.
    """
    n = u.numel()
    n_models = len(tensors)
    n_words = words.shape[1]
    n_blocks = n_programs(n, BLOCK_SIZE)
    partials = torch.zeros((2 * n_models, n_blocks), dtype=torch.float64, device=u.device)
    if n > 0:
        with device_guard(u):
            _emr_elect_kernel[(n_blocks,)](
                kernel_view(u),
                words,
                partials,
                kernel_view(base),
                tuple(kernel_view(t) for t in tensors),
                n,
                n_words,
                n_blocks,
                N_MODELS=n_models,
                ZERO_SIGN=zero_sign,
                BLOCK_SIZE=BLOCK_SIZE,
                num_warps=NUM_WARPS,
                **LAUNCH_OPTIONS,
            )
    sums = sum_rows(partials).reshape(n_models, 2)
    return sums[:, 0], sums[:, 1]


def reconstruct(out: torch.Tensor, base: torch.Tensor, u: torch.Tensor, words: torch.Tensor, lam: float) -> torch.Tensor:
    """out = base + (M ? lam * u : +0) into `out` (contiguous); lam an fp32 value, words int32 [ceil(n/32)]."""
    n = out.numel()
    if n == 0:
        return out
    grid = (n_programs(n, BLOCK_SIZE),)
    with device_guard(out):
        _emr_reconstruct_kernel[grid](
            kernel_view(out),
            kernel_view(base),
            kernel_view(u),
            words,
            lam,
            n,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
