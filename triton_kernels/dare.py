"""DARE (drop and rescale): the Philox keep mask, the L1 norms, and the merge (linear | ties).

Random numbers (specs/methods.md): element p of model i is kept when
u_p < fp32(density_i), u_p = (word0 >> 8) * 2^-24, word0 the first output of
Philox 4x32-10 with key (key64 low, key64 high) and counter
(p low 32 bits, p high 32 bits, 0, 0). tl.randint(key64, p) with an int64 p
is exactly that generator and layout, so the masks are the reference's bit for
bit, whatever the block size.

Rescale "l1" needs two norms per model first: `l1_norms` writes one fp64
partial per block (no atomics), and reduce.sum_rows adds the partials in a
fixed order; `l1_factors` forms f_i = fp32(n1 / n2) in fp64 on the device, or
1 when either norm is < 1e-7. The reference rounds the exact sums. Here every
term |tau| is exact in fp64 and the additions nest at most
D = 28 + numel / 2^20 deep (block tree, then the sequential lanes of
sum_rows, then its tree), so each norm is within D * 2^-53 (relative) of the
exact one: 2^-44 up to 2^28 elements. f_i is therefore the reference's fp32
value unless n1 / n2 lies within ~2D * 2^-53 of a rounding midpoint (about
D * 2^-28 of tensors, ~1e-6 for 2^28 elements); then it is its fp32 neighbour,
one ulp away, and the kept deltas of that model move by about an fp32 ulp.

The merge recomputes the mask instead of storing it, and keeps the weighted
deltas of one block in registers between the election and the disjoint sum.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    LAUNCH_OPTIONS,
    device_guard,
    kernel_view,
    load_f32,
    n_programs,
    sign_f32,
    store_rounded,
)
from .reduce import sum_rows

BLOCK_SIZE = 1024
NUM_WARPS = 4

# u = (word0 >> 8) * 2^-24: 24 random bits, exact in fp32.
UNIFORM_SCALE = tl.constexpr(2.0**-24)


@triton.jit
def _uniform(key_ptr, i, offs):
    """u for the elements offs (int64) of model i; keys are key64 stored as int64 bit patterns."""
    key = tl.load(key_ptr + i).to(tl.uint64, bitcast=True)
    word = tl.randint(key, offs)
    return (word >> 8).to(tl.float32) * UNIFORM_SCALE


@triton.jit
def _dare_keep_kernel(keep_ptr, u_ptr, key_ptr, dens_ptr, n_elements, WRITE_U: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    u = _uniform(key_ptr, 0, offs)
    tl.store(keep_ptr + offs, (u < tl.load(dens_ptr)).to(tl.uint8), mask=mask)
    if WRITE_U:
        tl.store(u_ptr + offs, u, mask=mask)


@triton.jit
def _dare_l1_partials_kernel(
    partials_ptr,  # fp64 [2 * N_MODELS, n_blocks]: rows 2i (|tau_i|) and 2i + 1 (|keep * tau_i|)
    base_ptr,
    xs,
    key_ptr,
    dens_ptr,
    n_elements,
    n_blocks,
    N_MODELS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    for i in tl.static_range(N_MODELS):
        # masked lanes read 0 - 0: they add nothing
        a = tl.abs(load_f32(xs[i] + offs, mask) - b)
        keep = _uniform(key_ptr, i, offs) < tl.load(dens_ptr + i)
        full = tl.sum(a.to(tl.float64), axis=0)
        kept = tl.sum(tl.where(keep, a, 0.0).to(tl.float64), axis=0)
        tl.store(partials_ptr + (2 * i) * n_blocks + pid, full)
        tl.store(partials_ptr + (2 * i + 1) * n_blocks + pid, kept)


@triton.jit
def _dare_merge_kernel(
    out_ptr,
    base_ptr,
    xs,
    key_ptr,  # int64 [N_MODELS]
    dens_ptr,  # fp32 [N_MODELS]
    factor_ptr,  # fp32 [N_MODELS]; 1 means no rescale (tau * 1 == tau)
    w_ptr,  # fp32 [N_MODELS]
    scale,  # fp32: c = lam (/ sum w) for linear, lam for ties
    n_elements,
    N_MODELS: tl.constexpr,
    TIES: tl.constexpr,
    COUNT_CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    # linear: acc = sum_i d_i; ties: acc = the election sum S (of d_i, or of sign(d_i))
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    ds = ()
    for i in tl.static_range(N_MODELS):
        tau = load_f32(xs[i] + offs, mask) - b
        keep = _uniform(key_ptr, i, offs) < tl.load(dens_ptr + i)
        tau_hat = tl.where(keep, tau * tl.load(factor_ptr + i), 0.0)
        d = tl.load(w_ptr + i) * tau_hat
        if TIES:
            ds = ds + (d,)
            if COUNT_CONSENSUS:
                acc = acc + sign_f32(d)  # small integers: exact in fp32
            else:
                acc = acc + d
        else:
            acc = acc + d
    if TIES:
        majority = tl.where(acc >= 0, 1.0, -1.0)
        mixed = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        div = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for i in tl.static_range(N_MODELS):
            agree = sign_f32(ds[i]) == majority
            mixed = mixed + tl.where(agree, ds[i], 0.0)
            if NORMALIZE:
                div = div + tl.where(agree, tl.load(w_ptr + i), 0.0)
        if NORMALIZE:
            # a true division: Triton's plain / on fp32 is approximate on GPUs
            mixed = tl.div_rn(mixed, tl.where(div == 0, 1.0, div))
        out = b + mixed * scale
    else:
        out = b + acc * scale
    store_rounded(out_ptr + offs, out, mask)


def keep_mask(keep: torch.Tensor, key: torch.Tensor, density: torch.Tensor, u: torch.Tensor | None = None) -> None:
    """keep (bool [n]) = u < density for one (tensor, seed, model); also writes u (fp32 [n]) when given.

    key: int64 [1] (key64's bit pattern); density: fp32 [1].
    """
    n = keep.numel()
    if n == 0:
        return
    grid = (n_programs(n, BLOCK_SIZE),)
    with device_guard(keep):
        _dare_keep_kernel[grid](
            keep.view(torch.uint8),
            u,
            key,
            density,
            n,
            WRITE_U=u is not None,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )


def l1_norms(base: torch.Tensor, tensors: Sequence[torch.Tensor], keys: torch.Tensor, densities: torch.Tensor) -> torch.Tensor:
    """fp64 [N, 2]: (sum |tau_i|, sum |keep_i * tau_i|) per model, partials summed in a fixed order."""
    n = base.numel()
    n_models = len(tensors)
    n_blocks = n_programs(n, BLOCK_SIZE)
    partials = torch.zeros((2 * n_models, n_blocks), dtype=torch.float64, device=base.device)
    if n > 0:
        with device_guard(base):
            _dare_l1_partials_kernel[(n_blocks,)](
                partials,
                kernel_view(base),
                tuple(kernel_view(t) for t in tensors),
                keys,
                densities,
                n,
                n_blocks,
                N_MODELS=n_models,
                BLOCK_SIZE=BLOCK_SIZE,
                num_warps=NUM_WARPS,
                **LAUNCH_OPTIONS,
            )
    return sum_rows(partials).reshape(n_models, 2)


def l1_factors(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], keys: torch.Tensor, densities: torch.Tensor, eps: float
) -> torch.Tensor:
    """fp32 [N]: fp32(n1 / n2) per model (fp64 division), 1 where n1 < eps or n2 < eps. Stays on the device."""
    norms = l1_norms(base, tensors, keys, densities)
    n1, n2 = norms[:, 0], norms[:, 1]
    ok = (n1 >= eps) & (n2 >= eps)
    one = torch.ones((), dtype=torch.float64, device=norms.device)
    return torch.where(ok, n1 / torch.where(ok, n2, one), one).to(torch.float32)


def merge(
    out: torch.Tensor,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    keys: torch.Tensor,
    densities: torch.Tensor,
    factors: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    *,
    ties: bool,
    count_consensus: bool = False,
    normalize: bool = False,
) -> torch.Tensor:
    """Drop, rescale and combine into `out` (contiguous); all inputs contiguous with out.numel() elements.

    keys int64 [N], densities / factors / weights fp32 [N] on out's device; scale an fp32 value.
    """
    n = out.numel()
    if n == 0:
        return out
    grid = (n_programs(n, BLOCK_SIZE),)
    with device_guard(out):
        _dare_merge_kernel[grid](
            kernel_view(out),
            kernel_view(base),
            tuple(kernel_view(t) for t in tensors),
            keys,
            densities,
            factors,
            weights,
            scale,
            n,
            N_MODELS=len(tensors),
            TIES=ties,
            COUNT_CONSENSUS=count_consensus,
            NORMALIZE=normalize and ties,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
