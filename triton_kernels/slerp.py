"""slerp, row-wise: row sums in fp64 first, then the per-element combine.

Pass 1 (`row_sums`): sum x*x, sum y*y, sum x*y per row in fp64 (each product of
two fp32 values is exact in fp64), one partial per (row, column block),
summed in a fixed order by reduce.sum_rows. The reference sums in an
unspecified fp64 order, so the sums agree to a relative ~1e-15; the
coefficients (formed from them on the device, in fp64) are then the same fp32
values except in rare last-bit cases, and the lerp branch (|dot| > 0.9995,
where the coefficients are 1 - t and t) does not depend on the sums at all.

Pass 2 (`combine`): out = (ca * x) + (cb * y) in fp32, three rounded ops,
rounded once to the output dtype: exact given (ca, cb).

Both passes tile [BLOCK_ROWS, BLOCK_COLS]: long rows are split into column
blocks, short rows share a program, so no lanes idle on narrow tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, store_rounded
from .reduce import sum_rows

TILE_SIZE = 1024  # BLOCK_ROWS * BLOCK_COLS
NUM_WARPS = 4


def _tiling(n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_ROWS, BLOCK_COLS, row blocks, column blocks) for an [n_rows, n_cols] tensor."""
    block_cols = min(TILE_SIZE, triton.next_power_of_2(max(n_cols, 1)))
    block_rows = TILE_SIZE // block_cols
    return block_rows, block_cols, triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols)


@triton.jit
def _tile(n_rows, n_cols, n_col_blocks, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows, mask, rows[:, None] * n_cols + cols[None, :]


@triton.jit
def _slerp_sums_kernel(
    partials_ptr,  # fp64 [n_rows, 3, n_col_blocks]: x.x, y.y, x.y of one column block of one row
    a_ptr,
    b_ptr,
    n_rows,
    n_cols,
    n_col_blocks,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, mask, offs = _tile(n_rows, n_cols, n_col_blocks, BLOCK_ROWS, BLOCK_COLS)
    x = load_f32(a_ptr + offs, mask).to(tl.float64)
    y = load_f32(b_ptr + offs, mask).to(tl.float64)
    dst = partials_ptr + rows * (3 * n_col_blocks) + tl.program_id(0) % n_col_blocks
    row_in = rows < n_rows
    tl.store(dst, tl.sum(x * x, axis=1), mask=row_in)
    tl.store(dst + n_col_blocks, tl.sum(y * y, axis=1), mask=row_in)
    tl.store(dst + 2 * n_col_blocks, tl.sum(x * y, axis=1), mask=row_in)


@triton.jit
def _slerp_combine_kernel(
    out_ptr, a_ptr, b_ptr, ca_ptr, cb_ptr, n_rows, n_cols, n_col_blocks, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    rows, mask, offs = _tile(n_rows, n_cols, n_col_blocks, BLOCK_ROWS, BLOCK_COLS)
    x = load_f32(a_ptr + offs, mask)
    y = load_f32(b_ptr + offs, mask)
    row_in = rows < n_rows
    ca = tl.load(ca_ptr + rows, mask=row_in, other=0.0)
    cb = tl.load(cb_ptr + rows, mask=row_in, other=0.0)
    out = ca[:, None] * x
    out = out + cb[:, None] * y
    store_rounded(out_ptr + offs, out, mask)


def row_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum x*x, sum y*y, sum x*y) per row, fp64 [rows] each; a, b contiguous [rows, cols]."""
    n_rows, n_cols = a.shape
    block_rows, block_cols, n_row_blocks, n_col_blocks = _tiling(n_rows, n_cols)
    partials = torch.zeros((3 * n_rows, max(n_col_blocks, 1)), dtype=torch.float64, device=a.device)
    if n_rows * n_cols > 0:
        with device_guard(a):
            _slerp_sums_kernel[(n_row_blocks * n_col_blocks,)](
                partials,
                kernel_view(a),
                kernel_view(b),
                n_rows,
                n_cols,
                n_col_blocks,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=NUM_WARPS,
                **LAUNCH_OPTIONS,
            )
    sums = sum_rows(partials).reshape(n_rows, 3)
    return sums[:, 0], sums[:, 1], sums[:, 2]


def combine(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """out = ca[row] * a + cb[row] * b; out, a, b contiguous [rows, cols]; ca, cb fp32 [rows]."""
    n_rows, n_cols = out.shape
    if out.numel() == 0:
        return out
    block_rows, block_cols, n_row_blocks, n_col_blocks = _tiling(n_rows, n_cols)
    with device_guard(out):
        _slerp_combine_kernel[(n_row_blocks * n_col_blocks,)](
            kernel_view(out),
            kernel_view(a),
            kernel_view(b),
            ca,
            cb,
            n_rows,
            n_cols,
            n_col_blocks,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
