"""TIES-Merging: the per-tensor merge after the exact trims, and the model-scope passes.

Per tensor (pymerge.ops.reference.ties_merge): the trims come from
histogram.top_k_trims (radix selection, no sort); `_trim_merge_kernel` then
reads each input once more and, per block, keeps tau_i by the trim rule, weights,
elects, merges, normalizes, scales and adds the base, rounding once. The same
kernel does breadcrumbs (a second, dropping trim per model; linear or TIES
combine). Per element, fp32, models in index order (reference.ties_combine):
    d_i = w_i * tau_hat_i
    S = ((+0 + d_0) + d_1) + ...  (or the sum of sign(d_i), small exact integers)
    maj = +1 if S >= 0 else -1;  agree_i = sign(d_i) == maj (zeros never agree)
    mixed = ((+0 + [agree_0] d_0) + ...);  normalize: mixed /= (sum of agreeing w_i, 0 -> 1)
    out = b + mixed * lam
Linear (breadcrumbs): acc = ((+0 + w_0 tau_hat_0) + ...); out = b + acc * c.

Model scope (reference.ties_sign_sum / ties_merge_model), given fp32 thresholds t_i:
    tau_hat_i = tau_i if |tau_i| >= t_i else +0;  S = ((+0 + tau_hat_0) + tau_hat_1) + ...
`_ties_model_kernel` writes per block sum sign(S) (SIGN_SUM), or merges: the elected
sign is + where S > 0, or S == 0 and the model-wide fallback is > 0 (torch's
sign(NaN) = 0 like a zero fallback: negatives); dis-mean divides the agreeing sum by
max(1, count). Every division is tl.div_rn (Triton's / on fp32 is approximate on GPUs).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, n_programs, sign_f32, store_rounded
from .histogram import BLOCK_SIZE, Trims, mag_key, top_k_keep

NUM_WARPS = 4


@triton.jit
def ties_combine(ds, w_ptr, N_MODELS: tl.constexpr, COUNT_CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr):
    """TIES steps 3-5 on the weighted deltas ds (a tuple of N_MODELS fp32 blocks): mixed."""
    s = tl.zeros_like(ds[0])
    for i in tl.static_range(N_MODELS):
        if COUNT_CONSENSUS:
            s = s + sign_f32(ds[i])  # small integers: exact in fp32
        else:
            s = s + ds[i]
    majority = tl.where(s >= 0, 1.0, -1.0)  # NaN: -1
    mixed = tl.zeros_like(s)
    div = tl.zeros_like(s)
    for i in tl.static_range(N_MODELS):
        agree = sign_f32(ds[i]) == majority
        mixed = mixed + tl.where(agree, ds[i], 0.0)
        if NORMALIZE:
            div = div + tl.where(agree, tl.load(w_ptr + i), 0.0)
    if NORMALIZE:
        mixed = tl.div_rn(mixed, tl.where(div == 0, 1.0, div))
    return mixed


@triton.jit
def _trim_merge_kernel(
    out_ptr,
    base_ptr,
    xs,
    thr_ptr,  # int32 [T]: trims 0..N-1 keep, N..2N-1 (DROP) drop
    take_ptr,  # int64 [T]
    max_ptr,  # int32 [T]
    off_ptr,  # int64 [T, n_blocks] (SPLIT)
    w_ptr,  # fp32 [N_MODELS]
    scale,  # fp32: lam (ties) or c (linear)
    n_elements,
    n_blocks,
    N_MODELS: tl.constexpr,
    DROP: tl.constexpr,
    SPLIT: tl.constexpr,
    TIES: tl.constexpr,
    COUNT_CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    ds = ()
    for i in tl.static_range(N_MODELS):
        # lanes past the end read tau = 0: they come last, so they never shift an
        # earlier lane's index among the threshold-equal keys
        tau = load_f32(xs[i] + offs, mask) - b
        key = mag_key(tau)
        keep = top_k_keep(key, i, thr_ptr, take_ptr, max_ptr, off_ptr, pid, n_blocks, SPLIT)
        if DROP:
            keep = keep & ~top_k_keep(key, N_MODELS + i, thr_ptr, take_ptr, max_ptr, off_ptr, pid, n_blocks, SPLIT)
        d = tl.load(w_ptr + i) * tl.where(keep, tau, 0.0)
        if TIES:
            ds = ds + (d,)
        else:
            acc = acc + d
    if TIES:
        acc = ties_combine(ds, w_ptr, N_MODELS, COUNT_CONSENSUS, NORMALIZE)
    store_rounded(out_ptr + offs, b + acc * scale, mask)


@triton.jit
def _ties_model_kernel(
    out_ptr,
    part_ptr,  # int32 [n_blocks] (SIGN_SUM)
    base_ptr,
    xs,
    th_ptr,  # fp32 [N_MODELS]
    fallback,  # -1, 0, 1
    lam,
    n_elements,
    N_MODELS: tl.constexpr,
    SIGN_SUM: tl.constexpr,
    DIS_MEAN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    s = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    ths = ()
    for i in tl.static_range(N_MODELS):
        tau = load_f32(xs[i] + offs, mask) - b
        th = tl.where(tl.abs(tau) >= tl.load(th_ptr + i), tau, 0.0)
        ths = ths + (th,)
        s = s + th
    if SIGN_SUM:
        # lanes past the end have S = 0
        sg = (s > 0).to(tl.int32) - (s < 0).to(tl.int32)
        tl.store(part_ptr + pid, tl.sum(sg, axis=0))
    else:
        pos = (s > 0) | ((s == 0) & (fallback > 0))
        total = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        count = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
        for i in tl.static_range(N_MODELS):
            agree = tl.where(pos, ths[i] > 0, ths[i] < 0)
            total = total + tl.where(agree, ths[i], 0.0)
            count = count + agree.to(tl.int32)
        if DIS_MEAN:
            total = tl.div_rn(total, tl.maximum(count, 1).to(tl.float32))
        store_rounded(out_ptr + offs, b + total * lam, mask)


def trim_merge(
    out: torch.Tensor,
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    trims: Trims,
    weights: torch.Tensor,
    scale: float,
    *,
    drop: bool,
    ties: bool,
    count_consensus: bool = False,
    normalize: bool = False,
) -> torch.Tensor:
    """out = base + combine(trimmed deltas) * scale; all flat and contiguous, numel >= 1.

    trims: N keep rules (2N with drop: model i keeps what trim i keeps and trim N + i does not).
    weights fp32 [N] on the device; scale an fp32 value.
    """
    n = out.numel()
    with device_guard(out):
        _trim_merge_kernel[(n_programs(n, BLOCK_SIZE),)](
            kernel_view(out),
            kernel_view(base),
            tuple(kernel_view(t) for t in xs),
            trims.thr,
            trims.take,
            trims.max_key,
            trims.offsets,
            weights,
            scale,
            n,
            trims.n_blocks,
            N_MODELS=len(xs),
            DROP=drop,
            SPLIT=trims.split,
            TIES=ties,
            COUNT_CONSENSUS=count_consensus,
            NORMALIZE=normalize and ties,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out


def _launch_model(out, part, base, xs, thresholds, fallback, lam, sign_sum, dis_mean):
    n = base.numel()
    with device_guard(base):
        _ties_model_kernel[(n_programs(n, BLOCK_SIZE),)](
            out,
            part,
            kernel_view(base),
            tuple(kernel_view(t) for t in xs),
            thresholds,
            fallback,
            lam,
            n,
            N_MODELS=len(xs),
            SIGN_SUM=sign_sum,
            DIS_MEAN=dis_mean,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )


def sign_sum(base: torch.Tensor, xs: Sequence[torch.Tensor], thresholds: torch.Tensor) -> int:
    """sum_p sign(S_p) (an exact integer); thresholds fp32 [N] on the device, numel >= 1."""
    part = torch.empty(n_programs(base.numel(), BLOCK_SIZE), dtype=torch.int32, device=base.device)
    _launch_model(None, part, base, xs, thresholds, 0, 1.0, True, False)
    return int(part.sum(dtype=torch.int64))


def merge_model(
    out: torch.Tensor,
    base: torch.Tensor,
    xs: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    fallback: int,
    lam: float,
    dis_mean: bool,
) -> torch.Tensor:
    """The model-scope merge pass into out (flat, contiguous, numel >= 1); fallback in {-1, 0, 1}."""
    _launch_model(kernel_view(out), None, base, xs, thresholds, fallback, lam, False, dis_mean)
    return out
