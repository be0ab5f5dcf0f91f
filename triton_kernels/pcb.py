"""PCB-Merging: scores, the fused merge given the statistics, and the per-tensor merge with exact quantiles.

Per element, in the fp32 op order of pymerge/ops/reference/pcb.py (each arrow
one rounded operation, no FMA, true divisions):
    tau_i  = f32(theta_i) - f32(theta_0);  S = ((0 + tau_0) + tau_1) + ...
    a_i    = min(max(|tau_i|, lo_i), hi_i)            (NaN-propagating, as torch)
    tt_i   = sign(tau_i) * a_i
    nrm_i  = (a_i - lo_i) / (hi_i - lo_i), or +0 where hi_i == lo_i
    beta_i = exp(f32(N) * (nrm_i * nrm_i - 1)) * tanh(tau_i * S)
    s_i    = max(beta_i - q_i, 0) / (M_i - q_i), or +0 where M_i == q_i
    num = ((0 + w_i tt_i) + ...), w_i = s_i or f32(lambda_i) * s_i;  den = ((0 + s_0) + s_1) + ...
    out    = f32(theta_0) + lam * (num / max(den, f32(1e-12)))   (lambdas: no lam)

exp and tanh: `exp_f32` / `tanh_f32` evaluate them in fp64 with a fixed sequence
of correctly rounded fp64 adds and multiplies (argument reduction by ln 2, a
Taylor polynomial of expm1) and round once to fp32: the same operations, in the
same order, as the CPU backend (csrc/cpu/pcb.cpp), so the two give the same bits
on every input; that result is the correctly rounded fp32 exp / tanh except in
astronomically rare double-rounding cases. torch's fp32 exp / tanh (the
reference) are within 1 ulp of it but not correctly rounded everywhere.

Per-tensor scope (`merge_tensor`): lo_i, hi_i are exact order statistics of |tau_i|
(histogram.keys_at_ranks on magnitude keys, two passes); the scores pass stores
beta [N, numel] (exp and tanh dominate the cost: cheaper to store and re-read
than to evaluate again) and counts the high digits of their order keys on the
fly; one low-digit pass over beta gives q_i (rank int(d(1-r))) and M_i (rank
d - 1, NaN above +inf as in torch.sort); the merge pass reads beta back.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, n_programs, sign_f32, store_rounded
from .histogram import BINS, KEY_MAG, KEY_ORDER, count_digits, key_digits, keys_at_ranks, keys_from_high
from .histogram import mag_values, order_values

BLOCK_SIZE = 1024
NUM_WARPS = 4

MODE_SCORES = 0
MODE_FUSED = 1
MODE_STORED = 2


# fp64 constants: a float literal combined with an fp64 tensor keeps its double value.
INV_LN2 = tl.constexpr(float.fromhex("0x1.71547652b82fep0"))
LN2_HI = tl.constexpr(float.fromhex("0x1.62e42feep-1"))  # 32 trailing zero bits: k * LN2_HI is exact
LN2_LO = tl.constexpr(float.fromhex("0x1.a39ef35793c76p-33"))
ROUND_SHIFT = tl.constexpr(float.fromhex("0x1.8p52"))  # x + it rounds x to an integer held in the low bits
# 1/n! for n = 14 .. 3
C14 = tl.constexpr(1.0 / 87178291200.0)
C13 = tl.constexpr(1.0 / 6227020800.0)
C12 = tl.constexpr(1.0 / 479001600.0)
C11 = tl.constexpr(1.0 / 39916800.0)
C10 = tl.constexpr(1.0 / 3628800.0)
C9 = tl.constexpr(1.0 / 362880.0)
C8 = tl.constexpr(1.0 / 40320.0)
C7 = tl.constexpr(1.0 / 5040.0)
C6 = tl.constexpr(1.0 / 720.0)
C5 = tl.constexpr(1.0 / 120.0)
C4 = tl.constexpr(1.0 / 24.0)
C3 = tl.constexpr(1.0 / 6.0)


@triton.jit
def _expm1_poly(r):
    """expm1(r) for |r| <= ln2/2 (+ slack): Taylor to r^14, remainder < 1e-18 relative."""
    p = r * C14 + C13
    p = p * r + C12
    p = p * r + C11
    p = p * r + C10
    p = p * r + C9
    p = p * r + C8
    p = p * r + C7
    p = p * r + C6
    p = p * r + C5
    p = p * r + C4
    p = p * r + C3
    p = p * r + 0.5
    p = p * r + 1.0
    return p * r


@triton.jit
def _reduce_ln2(x):
    """x = k ln2 + r, k = round(x / ln2), |x| <= 700: (r, 2^k, k == 0)."""
    shifted = x * INV_LN2 + ROUND_SHIFT
    k = shifted - ROUND_SHIFT
    scale = ((shifted.to(tl.int64, bitcast=True) + 1023) << 52).to(tl.float64, bitcast=True)
    r = (x - k * LN2_HI) - k * LN2_LO
    return r, scale, k == 0


@triton.jit
def exp_f32(xf):
    """fp32 exp(xf), evaluated in fp64 and rounded once."""
    x = xf.to(tl.float64)
    # beyond these the fp32 result is 0 or inf anyway; NaN passes through
    x = tl.where(x < -160.0, -160.0, x)
    x = tl.where(x > 100.0, 100.0, x)
    r, scale, k_zero = _reduce_ln2(x)
    return (scale * (1.0 + _expm1_poly(r))).to(tl.float32)


@triton.jit
def tanh_f32(xf):
    """fp32 tanh(xf): tanh|x| = expm1(2|x|) / (expm1(2|x|) + 2) in fp64, sign of x restored."""
    y = tl.abs(2.0 * xf.to(tl.float64))
    y = tl.where(y > 40.0, 40.0, y)  # tanh rounds to 1 long before
    r, scale, k_zero = _reduce_ln2(y)
    p = _expm1_poly(r)
    # k == 0: r == y and p is expm1(y) itself, accurate down to the subnormals
    em1 = tl.where(k_zero, p, scale * (1.0 + p) - 1.0)
    # fp64 / is the IEEE division (div.rn.f64) on GPUs; only fp32 / is approximate
    t = (em1 / (em1 + 2.0)).to(tl.float32)
    bits = (t.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (xf.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _max_nan(a, b):
    """torch.maximum: NaN in either operand gives NaN."""
    return tl.where(b != b, b, tl.where(a < b, b, a))


@triton.jit
def _min_nan(a, b):
    return tl.where(b != b, b, tl.where(b < a, b, a))


@triton.jit
def _clamp_min(x, c):
    """torch.clamp_min: keeps NaN (and -0 for c = 0)."""
    return tl.where(x < c, c, x)


@triton.jit
def _pcb_kernel(
    out_ptr,  # merge modes
    beta_ptr,  # fp32 [N_MODELS, n_elements]: written by SCORES, read by STORED
    hist_ptr,  # int64 [N_MODELS, BINS] (HIST): high digits of the beta order keys
    base_ptr,
    xs,
    lo_ptr,  # fp32 [N_MODELS] each
    hi_ptr,
    q_ptr,
    m_ptr,
    lambdas_ptr,  # fp32 [N_MODELS] (LAMBDAS)
    lam,
    den_min,
    n_elements,
    N_MODELS: tl.constexpr,
    MODE: tl.constexpr,
    LAMBDAS: tl.constexpr,
    HIST: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    taus = ()
    s_tau = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for i in tl.static_range(N_MODELS):
        tau = load_f32(xs[i] + offs, mask) - b
        taus = taus + (tau,)
        s_tau = s_tau + tau
    f_n = tl.full([BLOCK_SIZE], N_MODELS, tl.int32).to(tl.float32)
    num = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    den = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for i in tl.static_range(N_MODELS):
        row = tl.full([], i, tl.int64)  # row * n_elements may pass 2^31
        tau = taus[i]
        lo = tl.load(lo_ptr + i)
        hi = tl.load(hi_ptr + i)
        c = _min_nan(_max_nan(tl.abs(tau), lo), hi)
        if MODE == 2:
            beta = tl.load(beta_ptr + (offs + row * n_elements), mask=mask, other=0.0)
        else:
            dclip = hi - lo
            nrm = tl.where(dclip == 0, 0.0, tl.div_rn(c - lo, dclip))
            beta = exp_f32(f_n * (nrm * nrm - 1.0)) * tanh_f32(tau * s_tau)
        if MODE == 0:
            tl.store(beta_ptr + (offs + row * n_elements), beta, mask=mask)
            if HIST:
                hd, ld = key_digits(beta, 2)
                count_digits(hist_ptr, hist_ptr, i, hd, ld, mask, 1, False)
        else:
            tt = sign_f32(tau) * c
            q = tl.load(q_ptr + i)
            dq = tl.load(m_ptr + i) - q
            s = tl.where(dq == 0, 0.0, tl.div_rn(_clamp_min(beta - q, 0.0), dq))
            if LAMBDAS:
                num = num + (tl.load(lambdas_ptr + i) * s) * tt
            else:
                num = num + s * tt
            den = den + s
    if MODE != 0:
        tm = tl.div_rn(num, _clamp_min(den, den_min))
        if not LAMBDAS:
            tm = lam * tm
        store_rounded(out_ptr + offs, b + tm, mask)


def _launch(mode, *, out, beta, hist, base, xs, lo, hi, q=None, m=None, lambdas=None, lam=1.0, den_min=0.0):
    n = base.numel()
    with device_guard(base):
        _pcb_kernel[(n_programs(n, BLOCK_SIZE),)](
            None if out is None else kernel_view(out),
            beta,
            hist,
            kernel_view(base),
            tuple(kernel_view(t) for t in xs),
            lo,
            hi,
            q,
            m,
            lambdas,
            lam,
            den_min,
            n,
            N_MODELS=len(xs),
            MODE=mode,
            LAMBDAS=lambdas is not None,
            HIST=hist is not None,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )


def scores(
    beta: torch.Tensor, base: torch.Tensor, xs: Sequence[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor, hist: torch.Tensor | None = None
) -> torch.Tensor:
    """beta (fp32 [N, numel], contiguous) = the scores; hist (int64 [N, BINS], zeroed), when
    given, += the high-digit histograms of their order keys. numel >= 1; lo, hi fp32 [N]."""
    _launch(MODE_SCORES, out=None, beta=beta, hist=hist, base=base, xs=xs, lo=lo, hi=hi)
    return beta


def merge_with_stats(
    out, base, xs, lo, hi, q, m, lam: float, lambdas: torch.Tensor | None, den_min: float, beta: torch.Tensor | None = None
) -> torch.Tensor:
    """out (flat, numel >= 1) = the merge given the statistics (fp32 [N] each on the device).

    beta: the stored scores to read instead of evaluating them; lam, den_min fp32 values.
    """
    mode = MODE_FUSED if beta is None else MODE_STORED
    _launch(mode, out=out, beta=beta, hist=None, base=base, xs=xs, lo=lo, hi=hi, q=q, m=m, lambdas=lambdas, lam=lam, den_min=den_min)
    return out


def merge_tensor(out, base, xs, i_lo: int, i_hi: int, k_q: int, lam: float, lambdas: torch.Tensor | None, den_min: float):
    """Per-tensor PCB into out (flat, numel >= 1): exact clip bounds and score quantiles,
    no sort. Returns (lo, hi, q, M), fp32 [N] device tensors."""
    n_models, d = len(xs), base.numel()
    device = base.device
    ranks = torch.tensor([[i_lo, i_hi]] * n_models, dtype=torch.int64, device=device)
    keys, _, _ = keys_at_ranks(base, xs, KEY_MAG, ranks)
    lo, hi = mag_values(keys[:, 0]), mag_values(keys[:, 1])
    beta = torch.empty((n_models, d), dtype=torch.float32, device=device)
    high = torch.zeros((n_models, BINS), dtype=torch.int64, device=device)
    scores(beta, base, xs, lo, hi, high)
    ranks = torch.tensor([[k_q, d - 1]] * n_models, dtype=torch.int64, device=device)
    keys, _, _ = keys_from_high(None, list(beta.unbind(0)), KEY_ORDER, high, ranks)
    q, m = order_values(keys[:, 0]), order_values(keys[:, 1])
    merge_with_stats(out, base, xs, lo, hi, q, m, lam, lambdas, den_min, beta=beta)
    return lo, hi, q, m
