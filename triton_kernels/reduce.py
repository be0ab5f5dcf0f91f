"""Fixed-order fp64 reduction of per-block partial sums.

The reducing kernels (DARE's L1 norms, EMR's rescaler sums, slerp's row
norms) write one fp64 partial per block instead of using atomics, so that the
result does not depend on the order in which blocks finish. This kernel then
adds each row of partials in a fixed order: lane j of a BLOCK_COLS-wide
accumulator takes partials j, j + BLOCK_COLS, ... in sequence, and the lanes
are combined by one tl.sum tree. BLOCK_COLS depends only on the row length, so
the same inputs give the same bits on every run of a given device; across
devices (or the interpreter) the tree may associate differently, and the
result can differ in the last fp64 bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard

# lanes per program; short rows share a program (BLOCK_ROWS * BLOCK_COLS == REDUCE_BLOCK)
REDUCE_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sum_rows_kernel(partials_ptr, out_ptr, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_in = rows < n_rows
    lanes = tl.arange(0, BLOCK_COLS)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float64)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + lanes
        ptrs = partials_ptr + rows[:, None] * n_cols + cols[None, :]
        acc = acc + tl.load(ptrs, mask=row_in[:, None] & (cols < n_cols)[None, :], other=0.0)
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_in)


def sum_rows(partials: torch.Tensor) -> torch.Tensor:
    """out[r] = the fixed-order sum of partials[r, :] (fp64 [R, C]) -> fp64 [R]."""
    if partials.dtype != torch.float64 or partials.dim() != 2:
        raise ValueError("sum_rows takes an fp64 [rows, cols] tensor")
    partials = partials.contiguous()
    rows, cols = partials.shape
    out = torch.zeros(rows, dtype=torch.float64, device=partials.device)
    if rows == 0 or cols == 0:
        return out
    block_cols = min(REDUCE_BLOCK, triton.next_power_of_2(cols))
    block_rows = REDUCE_BLOCK // block_cols
    with device_guard(partials):
        _sum_rows_kernel[(triton.cdiv(rows, block_rows),)](
            partials,
            out,
            rows,
            cols,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
