"""Radix selection: 16-bit digit histograms of selection keys, and the exact top-k trim rule.

Keys (unsigned order == order of the values they stand for):
- KEY_MAG: |tau|, tau = f32(x) - f32(base): the fp32 bits with the sign cleared
  (both zeros are 0), every NaN the one key MAG_NAN_KEY above +inf, because
  torch's sort treats NaNs as equal and larger than everything. The trims of
  ties / breadcrumbs and PCB's clip bounds select on these. They are < 2^31, so
  the kernels keep them in int32.
- KEY_ABS: the same with NaN as 0xFFFFFFFF (pymerge.ops.selection.abs_tau_histogram).
- KEY_ORDER: fp32_order_key(x) of stored values x, -0 as +0, NaN as 0xFFFFFFFF
  (order_key_histogram, PCB's score quantiles).

The value at a 0-based ascending rank comes from two passes: `_digit_hist_kernel`
counts the high 16 key bits of every element, `locate` (a few torch ops on the
device) finds the bin holding the rank, and a second pass counts the low 16 bits
of the keys inside that bin. Counts are int64 atomics: integer adds commute, so
the histograms do not depend on the order in which blocks run.

The trim rule of specs/methods.md ("exactly k kept, lower flat index first among
values equal to the threshold") then needs, only where the threshold's equal
keys are split between kept and dropped, how many equal keys precede each block:
`_equal_counts_kernel` counts them per block, an exclusive prefix over the
blocks gives the offsets, and the merge kernels keep an equal key when its index
among the equal keys (offset + in-block exclusive count) is below `take`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, n_programs

BLOCK_SIZE = 1024
NUM_WARPS = 4
RADIX_BITS = 16
BINS = 1 << RADIX_BITS

# key kinds (the kernels' KEY constexpr)
KEY_MAG = 0
KEY_ABS = 1
KEY_ORDER = 2

MAG_NAN_KEY = 0x7FC00000  # the bits of the canonical quiet NaN: above +inf (0x7F800000)
MAG_INF_KEY = 0x7F800000
# No magnitude key reaches it: a threshold that keeps nothing.
MAG_NONE_KEY = 0x7FFFFFFF
TAKE_ALL = 1 << 62  # `take` for a rule that keeps every equal key


@triton.jit
def mag_key(x):
    """int32 key of |x| (x fp32): the bits with the sign cleared, NaN -> MAG_NAN_KEY."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(x != x, 0x7FC00000, bits)


@triton.jit
def order_key(x):
    """uint32 fp32_order_key of x (fp32) with -0 counted as +0 and NaN as 0xFFFFFFFF."""
    bits = tl.where(x == 0, 0.0, x).to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    return tl.where(x != x, 0xFFFFFFFF, key)


@triton.jit
def key_digits(x, KEY: tl.constexpr):
    """(high, low) 16-bit digits (int32) of the key of fp32 x."""
    if KEY == 2:
        k = order_key(x)
        hi = (k >> 16).to(tl.int32)
        lo = (k & 0xFFFF).to(tl.int32)
    else:
        k = mag_key(x)
        hi = k >> 16
        lo = k & 0xFFFF
        if KEY == 1:
            nan = x != x
            hi = tl.where(nan, 0xFFFF, hi)
            lo = tl.where(nan, 0xFFFF, lo)
    return hi, lo


@triton.jit
def count_digits(hist_ptr, prefix_ptr, row, hi, lo, mask, N_SLOTS: tl.constexpr, LOW: tl.constexpr):
    """Add one block's digits of one row to the histograms.

    High pass: hist row `row` counts hi. Low pass: slot s of the row (histogram row
    row * N_SLOTS + s) counts lo of the keys whose hi equals its prefix.
    """
    if LOW:
        for s in tl.static_range(N_SLOTS):
            p = tl.load(prefix_ptr + row * N_SLOTS + s)
            tl.atomic_add(hist_ptr + (row * N_SLOTS + s) * 65536 + lo, 1, mask=mask & (hi == p), sem="relaxed")
    else:
        tl.atomic_add(hist_ptr + row * 65536 + hi, 1, mask=mask, sem="relaxed")


@triton.jit
def _digit_hist_kernel(
    hist_ptr,  # int64 [N_ROWS, BINS] (high) or [N_ROWS * N_SLOTS, BINS] (low)
    base_ptr,  # unused with KEY_ORDER
    xs,  # N_ROWS tensors of n_elements
    prefix_ptr,  # int32 [N_ROWS, N_SLOTS] (low pass)
    n_elements,
    KEY: tl.constexpr,
    N_ROWS: tl.constexpr,
    N_SLOTS: tl.constexpr,
    LOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    if KEY != 2:
        b = load_f32(base_ptr + offs, mask)
    for i in tl.static_range(N_ROWS):
        x = load_f32(xs[i] + offs, mask)
        if KEY != 2:
            x = x - b
        hi, lo = key_digits(x, KEY)
        count_digits(hist_ptr, prefix_ptr, i, hi, lo, mask, N_SLOTS, LOW)


@triton.jit
def _equal_counts_kernel(
    counts_ptr,  # int32 [N_ROWS, n_blocks]
    base_ptr,
    xs,
    thr_ptr,  # int32 [N_ROWS]: magnitude keys
    n_elements,
    n_blocks,
    N_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    b = load_f32(base_ptr + offs, mask)
    for i in tl.static_range(N_ROWS):
        key = mag_key(load_f32(xs[i] + offs, mask) - b)
        eq = mask & (key == tl.load(thr_ptr + i))
        tl.store(counts_ptr + i * n_blocks + pid, tl.sum(eq.to(tl.int32), axis=0))


@triton.jit
def top_k_keep(key, t, thr_ptr, take_ptr, max_ptr, off_ptr, pid, n_blocks, SPLIT: tl.constexpr):
    """Keep mask of trim t for one block of magnitude keys (int32).

    Kept: key > thr, and keys == thr while their index among the equal keys is
    below take (all of them when the rule does not split them); never a key above
    max (inclusive trims: NaN is not >= any threshold).
    """
    thr = tl.load(thr_ptr + t)
    eq = key == thr
    if SPLIT:
        e = eq.to(tl.int32)
        before = tl.load(off_ptr + t * n_blocks + pid) + (tl.cumsum(e, axis=0) - e).to(tl.int64)
        eq = eq & (before < tl.load(take_ptr + t))
    return ((key > thr) | eq) & (key <= tl.load(max_ptr + t))


# ---------------------------------------------------------------- launches


def _launch_hist(hist, base, rows, prefixes, n, key, n_slots, low):
    with device_guard(hist):
        _digit_hist_kernel[(n_programs(n, BLOCK_SIZE),)](
            hist,
            None if base is None else kernel_view(base),
            tuple(kernel_view(r) for r in rows),
            prefixes,
            n,
            KEY=key,
            N_ROWS=len(rows),
            N_SLOTS=n_slots,
            LOW=low,
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )


def digit_histogram(out: torch.Tensor, base, values: torch.Tensor, key: int, prefix: int | None) -> torch.Tensor:
    """out (int64 [BINS], zeroed) += one digit histogram of one tensor's keys.

    prefix None: the high digits; else the low digits of the keys whose high digit is prefix.
    base: None for KEY_ORDER (keys of the values), else the base of tau = values - base.
    """
    n = values.numel()
    if n == 0:
        return out
    prefixes = None
    if prefix is not None:
        prefixes = torch.tensor([prefix], dtype=torch.int32, device=out.device)
    _launch_hist(out.view(1, BINS), base, [values], prefixes, n, key, 1, prefix is not None)
    return out


def high_histograms(base, rows: Sequence[torch.Tensor], key: int) -> torch.Tensor:
    """int64 [len(rows), BINS]: the high-digit histogram of each row's keys."""
    n = rows[0].numel()
    hist = torch.zeros((len(rows), BINS), dtype=torch.int64, device=rows[0].device)
    if n > 0:
        _launch_hist(hist, base, rows, None, n, key, 1, False)
    return hist


def locate(hist: torch.Tensor, ranks: torch.Tensor):
    """(bin, count below the bin, count in the bin), int64 [R, S] each, of the 0-based
    ranks [R, S] in the histograms [R, BINS] (ranks within the totals)."""
    cum = hist.cumsum(1)
    b = torch.searchsorted(cum, ranks, right=True).clamp_(max=BINS - 1)
    at = cum.gather(1, b)
    inside = hist.gather(1, b)
    return b, at - inside, inside


def keys_from_high(base, rows: Sequence[torch.Tensor], key: int, high: torch.Tensor, ranks: torch.Tensor):
    """The keys at ranks (int64 [R, S], 0-based ascending, per row) given the rows'
    high histograms: the low pass and the second locate. Returns int64 [R, S] each:
    (key, keys below it, keys equal to it). Stays on the device."""
    n_rows, n_slots = ranks.shape
    hb, below, _ = locate(high, ranks)
    low = torch.zeros((n_rows * n_slots, BINS), dtype=torch.int64, device=high.device)
    _launch_hist(low, base, rows, hb.to(torch.int32).contiguous(), rows[0].numel(), key, n_slots, True)
    lb, below_low, equal = locate(low, (ranks - below).reshape(-1, 1))
    keys = (hb << RADIX_BITS) | lb.reshape(n_rows, n_slots)
    return keys, below + below_low.reshape(n_rows, n_slots), equal.reshape(n_rows, n_slots)


def keys_at_ranks(base, rows: Sequence[torch.Tensor], key: int, ranks: torch.Tensor):
    """keys_from_high after the high pass: two reads of every row (and of base)."""
    return keys_from_high(base, rows, key, high_histograms(base, rows, key), ranks)


def mag_values(keys: torch.Tensor) -> torch.Tensor:
    """fp32 values of magnitude keys (int64): the bit patterns themselves."""
    return keys.to(torch.int32).view(torch.float32)


def order_values(keys: torch.Tensor) -> torch.Tensor:
    """fp32 values of order keys (int64 holding uint32); 0xFFFFFFFF is NaN."""
    bits = torch.where(keys >= 0x80000000, keys ^ 0x80000000, keys ^ 0xFFFFFFFF)
    bits = torch.where(bits >= 0x80000000, bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


# ---------------------------------------------------------------- the top-k trims


def equal_offsets(base: torch.Tensor, rows: Sequence[torch.Tensor], thr: torch.Tensor) -> torch.Tensor:
    """int64 [R, n_blocks]: per row, the keys equal to thr[row] (int32 magnitude keys) in the
    blocks before each block of BLOCK_SIZE elements. numel >= 1."""
    n = base.numel()
    n_blocks = n_programs(n, BLOCK_SIZE)
    counts = torch.empty((len(rows), n_blocks), dtype=torch.int32, device=base.device)
    with device_guard(base):
        _equal_counts_kernel[(n_blocks,)](
            counts,
            kernel_view(base),
            tuple(kernel_view(r) for r in rows),
            thr,
            n,
            n_blocks,
            N_ROWS=len(rows),
            BLOCK_SIZE=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    counts = counts.to(torch.int64)
    return counts.cumsum(1) - counts


@dataclass
class Trims:
    """Per trim t (int32 / int64 device tensors): the keep rule of `top_k_keep`."""

    thr: torch.Tensor  # int32 [T]
    take: torch.Tensor  # int64 [T]
    max_key: torch.Tensor  # int32 [T]
    offsets: torch.Tensor  # int64 [T, n_blocks] (a [T, 1] dummy unless split)
    split: bool  # some trim keeps only part of its threshold-equal keys
    n_blocks: int


def top_k_trims(base: torch.Tensor, xs: Sequence[torch.Tensor], requests: Sequence[tuple[int, int]], inclusive: bool = False) -> Trims:
    """The keep rules of requests (model index, k): keep the k largest |xs[m] - base|.

    Exactly k, lower flat index first among equal values; inclusive: every value
    >= the k-th largest except NaN. k <= 0 keeps none, k >= numel keeps all.
    Reads every model that needs a threshold twice (one high and one low pass,
    all models per block), a third time only for models whose threshold-equal
    values are split. One host sync: the thresholds and counts.
    """
    n = base.numel()
    device = base.device
    n_blocks = n_programs(n, BLOCK_SIZE)
    thr = [MAG_NONE_KEY] * len(requests)
    take = [0] * len(requests)
    max_key = [MAG_NONE_KEY] * len(requests)
    models: list[int] = []
    slots: dict[int, list[tuple[int, int]]] = {}  # model -> [(request, rank)]
    for r, (m, k) in enumerate(requests):
        if k <= 0 or n <= 0:
            continue  # none: nothing reaches MAG_NONE_KEY
        if k >= n:
            thr[r], take[r] = 0, TAKE_ALL  # all
            continue
        if m not in slots:
            slots[m] = []
            models.append(m)
        slots[m].append((r, n - k))
    split_rows: list[tuple[int, int]] = []  # (request, model)
    if models:
        n_slots = max(len(s) for s in slots.values())
        ranks = [[rank for _, rank in slots[m]] for m in models]
        ranks = [row + [row[-1]] * (n_slots - len(row)) for row in ranks]
        rows = [xs[m] for m in models]
        keys, less, equal = keys_at_ranks(base, rows, KEY_MAG, torch.tensor(ranks, dtype=torch.int64, device=device))
        stats = torch.stack([keys, less, equal]).tolist()  # the one host sync
        for j, m in enumerate(models):
            for s, (r, rank) in enumerate(slots[m]):
                key, below, eq = stats[0][j][s], stats[1][j][s], stats[2][j][s]
                k = n - rank
                thr[r] = key
                if inclusive:
                    take[r], max_key[r] = TAKE_ALL, MAG_INF_KEY
                else:
                    take[r] = k - (n - below - eq)
                    if take[r] < eq:
                        split_rows.append((r, m))
                    else:
                        take[r] = TAKE_ALL
    thr_t = torch.tensor(thr, dtype=torch.int32, device=device)
    offsets = torch.zeros((len(requests), n_blocks if split_rows else 1), dtype=torch.int64, device=device)
    if split_rows:
        rows = [r for r, _ in split_rows]
        offsets[rows] = equal_offsets(base, [xs[m] for _, m in split_rows], thr_t[rows].contiguous())
    return Trims(
        thr=thr_t,
        take=torch.tensor(take, dtype=torch.int64, device=device),
        max_key=torch.tensor(max_key, dtype=torch.int32, device=device),
        offsets=offsets,
        split=bool(split_rows),
        n_blocks=n_blocks,
    )
