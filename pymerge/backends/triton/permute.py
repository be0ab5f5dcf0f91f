"""permute_average with the Triton kernel (triton_kernels/permute.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.triton._lib import check_device, fp32_tensor, kernels
from pymerge.ops.reference._common import FLOAT_DTYPES, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_out_dtype
from pymerge.ops.reference.permute import _check_maps

__all__ = ["permute_average"]


def permute_average(
    tensors: Sequence[torch.Tensor],
    coeffs,
    row_maps: Sequence[torch.Tensor | None] | None = None,
    col_maps: Sequence[torch.Tensor | None] | None = None,
    *,
    normalize_coverage: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as pymerge.ops.reference.permute_average (out_dtype: fp32, fp16 or bf16); bit-identical."""
    k = kernels()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("permute_average: at least one model tensor is needed")
    ndim = tensors[0].dim()
    if ndim not in (1, 2):
        raise ValueError(f"permute_average: tensors must be 1-D or 2-D, got {ndim}-D")
    for i, w in enumerate(tensors):
        if w.dtype not in FLOAT_DTYPES:
            raise ValueError(f"permute_average: model {i}: dtype {w.dtype} is not one of fp32, fp16, bf16")
        if w.dim() != ndim:
            raise ValueError(f"permute_average: model {i} is {w.dim()}-D, model 0 is {ndim}-D")
    c = per_model(coeffs, n, "coeffs")
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    device = check_device(tensors)
    rows, n_rows = _check_maps(row_maps, [w.shape[0] for w in tensors], "row")
    if ndim == 1:
        if col_maps is not None and any(q is not None for q in col_maps):
            raise ValueError("permute_average: col_maps given for 1-D tensors")
        out = torch.empty((n_rows,), dtype=out_dtype, device=device)
        # one row: the map indexes the columns, which the tiles run along
        weights = [w.detach().contiguous().reshape(1, -1) for w in tensors]
        rows, cols = [None] * n, rows
        out2d = out.view(1, -1)
    else:
        cols, n_cols = _check_maps(col_maps, [w.shape[1] for w in tensors], "col")
        out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=device)
        weights = [w.detach().contiguous() for w in tensors]
        out2d = out
    if out.numel() == 0:
        return out
    k.permute.permute_average(
        out2d,
        weights,
        fp32_tensor(c, device),
        [None if p is None else p.to(device).contiguous() for p in rows],
        [None if q is None else q.to(device).contiguous() for q in cols],
        normalize_coverage=normalize_coverage,
    )
    return out
