"""Shared pieces of the Triton kernels: exact dtype conversions, launch options, views.

bf16 tensors reach the kernels as int16 bit patterns (`kernel_view`) and are
widened / rounded with integer ops (`load_f32`, `store_rounded`). The
interpreter (TRITON_INTERPRET=1, how CI runs these kernels) truncates on
fp32 -> bf16, so doing the conversion on the bits keeps the tested code and the
GPU code the same; on a GPU the few integer ops are hidden behind memory
traffic. fp16 and fp32 use the native conversions, which are exact (widening)
or round to nearest-even (narrowing) on both.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Passed to every launch. Triton contracts a*b + c into one FMA by default on
# GPUs; the contract rounds the product and the sum separately.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def kernel_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor as the kernels take it: bf16 as its int16 bit patterns, others unchanged."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def device_guard(t: torch.Tensor):
    """Launch on t's device (Triton uses the current CUDA device and its current stream)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def n_programs(n: int, block: int) -> int:
    return max(1, triton.cdiv(n, block))


@triton.jit
def load_f32(ptrs, mask):
    """Load stored values and widen them exactly to fp32 (masked lanes read +0).

    An int16 pointer holds bf16 bit patterns: bf16 is the top half of an fp32.
    """
    if ptrs.dtype.element_ty == tl.int16:
        bits = tl.load(ptrs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def round_bf16_bits(x):
    """fp32 -> bf16 bit pattern (uint32 holding 16 bits), round to nearest-even.

    Adding 0x7FFF plus the lowest kept bit rounds ties to even; a carry into the
    exponent is the correct rounding up (to the next binade or to inf). NaN
    becomes the quiet NaN 0x7FC0.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    return tl.where(x != x, 0x7FC0, rounded)


@triton.jit
def store_rounded(ptrs, x, mask):
    """Round fp32 x once (nearest-even) to the pointer's dtype and store it.

    int16 pointers receive bf16 bit patterns.
    """
    if ptrs.dtype.element_ty == tl.int16:
        bits = round_bf16_bits(x)
        tl.store(ptrs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def sign_f32(x):
    """sign(x) as fp32: +1, -1, or 0 for +-0 and NaN (NaN then matches neither sign)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
