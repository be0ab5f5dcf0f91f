"""permute_average on the CPU (csrc/cpu/permute.cpp): a tiled gather, no permuted copies."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, check_cpu, fp32, lib, tag
from pymerge.ops.reference._common import per_model
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
    """out[r, c] = sum_i c_i * W_i[P_i[r], Q_i[c]], bit for bit as the reference.

    Same arguments, validation and fp32 op order as
    pymerge.ops.reference.permute_average; -1 in a map reads zero.
    """
    kernels = lib()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("permute_average: at least one model tensor is needed")
    ndim = tensors[0].dim()
    if ndim not in (1, 2):
        raise ValueError(f"permute_average: tensors must be 1-D or 2-D, got {ndim}-D")
    for i, w in enumerate(tensors):
        check_cpu(w, f"model {i}")
        if w.dtype not in DTYPE_TAGS:
            raise ValueError(f"permute_average: model {i}: dtype {w.dtype} is not one of fp32, fp16, bf16")
        if w.dim() != ndim:
            raise ValueError(f"permute_average: model {i} is {w.dim()}-D, model 0 is {ndim}-D")
    c = [fp32(v) for v in per_model(coeffs, n, "coeffs")]
    out_dtype = tensors[0].dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    for maps in (row_maps, col_maps):
        for i, p in enumerate(maps or []):
            if isinstance(p, torch.Tensor):
                check_cpu(p, f"map of model {i}")
    rows, n_rows = _check_maps(row_maps, [w.shape[0] for w in tensors], "row")
    if ndim == 1:
        if col_maps is not None and any(q is not None for q in col_maps):
            raise ValueError("permute_average: col_maps given for 1-D tensors")
        shape = (n_rows,)
    else:
        cols, n_cols = _check_maps(col_maps, [w.shape[1] for w in tensors], "col")
        shape = (n_rows, n_cols)

    out = empty(shape, dtype=out_dtype)
    if out.numel() == 0:
        return out
    # Keep the contiguous copies alive until the kernel has returned.
    ws = [w.detach().contiguous() for w in tensors]
    rmaps = [p.contiguous() if p is not None else None for p in rows]
    if ndim == 1:
        # One row whose columns are mapped by the row maps.
        k_rows, k_cols = 1, n_rows
        in_rows, in_cols = [1] * n, [w.shape[0] for w in ws]
        pmaps, qmaps = [None] * n, rmaps
    else:
        k_rows, k_cols = n_rows, n_cols
        in_rows, in_cols = [w.shape[0] for w in ws], [w.shape[1] for w in ws]
        pmaps, qmaps = rmaps, [q.contiguous() if q is not None else None for q in cols]
    kernels.permute_average(
        out.data_ptr(), DTYPE_TAGS[out_dtype], k_rows, k_cols,
        [w.data_ptr() for w in ws], [tag(w, f"model {i}") for i, w in enumerate(ws)], in_rows, in_cols,
        [p.data_ptr() if p is not None else 0 for p in pmaps],
        [q.data_ptr() if q is not None else 0 for q in qmaps],
        c, bool(normalize_coverage),
    )
    return out
