"""permute_average: out[r, c] = sum_i c_i * W_i[P_i[r], Q_i[c]], a tiled gather, no permuted copies.

Per output element, fp32, models in order (pymerge.ops.reference.permute_average):
    valid_i = P_i[r] != -1 and Q_i[c] != -1
    acc = +0;  acc = acc + (valid_i ? c_i * W_i[P_i[r], Q_i[c]] : +0)
    cov = +0;  cov = cov + (valid_i ? c_i : +0)            (normalize_coverage)
    out = cov == 0 ? +0 : acc / cov                         (normalize_coverage)
rounded once: bit-identical to the reference. A model without a map on an
axis (None) reads that axis in place. The op layer passes a 1-D weight as one
row, its map as the column map, so that tiles run along the long axis.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, kernel_view, load_f32, store_rounded

BLOCK_ROWS = 16
BLOCK_COLS = 128
# a single row (a 1-D weight) is tiled along its length only
LINE_BLOCK_COLS = 1024
NUM_WARPS = 4


@triton.jit
def _permute_average_kernel(
    out_ptr,  # [n_rows, n_cols], contiguous
    ws,  # tuple of N_MODELS weights, each contiguous [rows_i, w_cols_i]
    w_cols_ptr,  # int64 [N_MODELS]: each weight's row length
    row_maps,  # tuple of N_MODELS int32/int64 maps [n_rows], or None for in-place rows
    col_maps,  # tuple of N_MODELS maps [n_cols], or None
    coef_ptr,  # fp32 [N_MODELS]
    n_rows,
    n_cols,
    n_col_blocks,
    N_MODELS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # a 1-D grid of tiles: no per-axis grid limit on either side
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_in = rows < n_rows
    col_in = cols < n_cols
    tile = row_in[:, None] & col_in[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    cov = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for i in tl.static_range(N_MODELS):
        if row_maps[i] is None:
            src_rows = rows
        else:
            src_rows = tl.load(row_maps[i] + rows, mask=row_in, other=-1).to(tl.int64)
        if col_maps[i] is None:
            src_cols = cols
        else:
            src_cols = tl.load(col_maps[i] + cols, mask=col_in, other=-1).to(tl.int64)
        valid = tile & (src_rows >= 0)[:, None] & (src_cols >= 0)[None, :]
        ptrs = ws[i] + src_rows[:, None] * tl.load(w_cols_ptr + i) + src_cols[None, :]
        x = load_f32(ptrs, valid)
        ci = tl.load(coef_ptr + i)
        acc = acc + tl.where(valid, ci * x, 0.0)
        if NORMALIZE:
            cov = cov + tl.where(valid, ci, 0.0)
    if NORMALIZE:
        # a true division: Triton's plain / on fp32 is approximate on GPUs
        acc = tl.where(cov == 0, 0.0, tl.div_rn(acc, tl.where(cov == 0, 1.0, cov)))
    store_rounded(out_ptr + rows[:, None] * n_cols + cols[None, :], acc, tile)


def permute_average(
    out: torch.Tensor,
    weights: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    row_maps: Sequence[torch.Tensor | None],
    col_maps: Sequence[torch.Tensor | None],
    *,
    normalize_coverage: bool = False,
) -> torch.Tensor:
    """Fill out ([n_rows, n_cols] contiguous) from 2-D contiguous weights and validated maps.

    coeffs: fp32 [N] on out's device; maps: contiguous int32/int64 with entries in
    [-1, that weight's size on the axis), or None for the identity.
    """
    n_rows, n_cols = out.shape
    if out.numel() == 0:
        return out
    w_cols = torch.tensor([w.shape[1] for w in weights], dtype=torch.int64, device=out.device)
    # an empty weight is never read (its maps are all -1), but a null pointer cannot be passed
    weights = [w if w.numel() else w.new_zeros(1) for w in weights]
    block_rows, block_cols = (1, LINE_BLOCK_COLS) if n_rows == 1 else (BLOCK_ROWS, BLOCK_COLS)
    n_col_blocks = triton.cdiv(n_cols, block_cols)
    grid = (triton.cdiv(n_rows, block_rows) * n_col_blocks,)
    with device_guard(out):
        _permute_average_kernel[grid](
            kernel_view(out),
            tuple(kernel_view(w) for w in weights),
            w_cols,
            tuple(row_maps),
            tuple(col_maps),
            coeffs,
            n_rows,
            n_cols,
            n_col_blocks,
            N_MODELS=len(weights),
            NORMALIZE=normalize_coverage,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=NUM_WARPS,
            **LAUNCH_OPTIONS,
        )
    return out
