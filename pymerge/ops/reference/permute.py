"""Torch reference of permute_average: a weighted sum of index-mapped weights."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.ops.reference._common import FLOAT_DTYPES, f32, finish, per_model, resolve_out_dtype

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_maps(
    maps: Sequence[torch.Tensor | None] | None,
    sizes: list[int],
    axis_name: str,
) -> tuple[list[torch.Tensor | None], int]:
    """Validate one axis's maps; return (maps as int64 or None, output length)."""
    n = len(sizes)
    if maps is None:
        maps = [None] * n
    maps = list(maps)
    if len(maps) != n:
        raise ValueError(f"permute_average: {len(maps)} {axis_name} maps for {n} models")
    out_len = None
    checked: list[torch.Tensor | None] = []
    for i, p in enumerate(maps):
        if p is None:
            checked.append(None)
            continue
        if not isinstance(p, torch.Tensor) or p.dtype not in INDEX_DTYPES or p.dim() != 1:
            desc = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"permute_average: {axis_name} map of model {i} must be a 1-D int32/int64 "
                             f"tensor, got {desc}")
        if out_len is None:
            out_len = p.shape[0]
        elif p.shape[0] != out_len:
            raise ValueError(f"permute_average: {axis_name} maps have lengths {out_len} and {p.shape[0]} "
                             f"(model {i})")
        if p.numel():
            lo, hi = int(p.min()), int(p.max())
            if lo < -1 or hi >= sizes[i]:
                raise ValueError(f"permute_average: {axis_name} map of model {i} has entries in [{lo}, {hi}], "
                                 f"outside [-1, {sizes[i] - 1}] (model axis size {sizes[i]})")
        checked.append(p.to(torch.int64))
    for i, p in enumerate(checked):
        if p is None:
            if out_len is None:
                out_len = sizes[i]
            elif sizes[i] != out_len:
                raise ValueError(f"permute_average: model {i} has no {axis_name} map (identity) but its axis "
                                 f"size {sizes[i]} != output size {out_len}")
    return checked, out_len


def _gather(x: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """x indexed by idx along axis; -1 entries read row/column 0 (masked later)."""
    if x.shape[axis] == 0:
        # a 0-size axis can only be mapped by all -1: nothing to read
        shape = list(x.shape)
        shape[axis] = idx.shape[0]
        return x.new_zeros(shape)
    return x.index_select(axis, idx.to(x.device).clamp_min(0))


def permute_average(
    tensors: Sequence[torch.Tensor],
    coeffs,
    row_maps: Sequence[torch.Tensor | None] | None = None,
    col_maps: Sequence[torch.Tensor | None] | None = None,
    *,
    normalize_coverage: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out[r, c] = sum_i c_i * W_i[P_i[r], Q_i[c]] without materialising permuted copies.

    tensors: N weights, all 2-D or all 1-D (1-D uses the row maps only; col_maps
    must then be None), fp32/fp16/bf16, possibly of different sizes.
    coeffs: a float or N floats, each rounded to fp32 (RNE).
    row_maps / col_maps: None, or N entries each None (identity) or a 1-D
    int32/int64 index tensor into that model's axis; -1 means "no unit here".
    All given maps of an axis share one length, the output's size on that axis;
    a model with the identity must then have exactly that size. Entries must
    lie in [-1, size - 1]. 0-size axes are allowed.

    Per output element (r, c), in fp32, models in order i = 1..N:
      covered_i = P_i[r] != -1 and Q_i[c] != -1
      acc = +0; acc = acc + (f32(c_i) * f32(W_i[P_i[r], Q_i[c]])) for covered i
      (an uncovered model adds nothing: never -0 in acc, so this equals adding +0)
    normalize_coverage: cov = +0; cov = cov + f32(c_i) for covered i;
      out = acc / cov, or +0 where cov == 0.
    One rounding to out_dtype (default tensors[0].dtype). Every op is an exact
    IEEE fp32 op, so all backends agree bit for bit.
    """
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
    out_dtype = resolve_out_dtype(tensors, out_dtype)
    rows, n_rows = _check_maps(row_maps, [w.shape[0] for w in tensors], "row")
    if ndim == 1:
        if col_maps is not None and any(q is not None for q in col_maps):
            raise ValueError("permute_average: col_maps given for 1-D tensors")
        cols, n_cols = [None] * n, None
    else:
        cols, n_cols = _check_maps(col_maps, [w.shape[1] for w in tensors], "col")
    shape = (n_rows,) if ndim == 1 else (n_rows, n_cols)

    dev = tensors[0].device
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    acc = torch.zeros(shape, dtype=torch.float32, device=dev)
    cov = torch.zeros(shape, dtype=torch.float32, device=dev)
    for i, w in enumerate(tensors):
        x = f32(w)
        valid = torch.ones(shape, dtype=torch.bool, device=dev)
        p = rows[i]
        if p is not None:
            x = _gather(x, 0, p)
            valid = valid & (p >= 0).to(dev).reshape((-1,) + (1,) * (ndim - 1))
        if ndim == 2 and cols[i] is not None:
            q = cols[i]
            x = _gather(x, 1, q)
            valid = valid & (q >= 0).to(dev)[None, :]
        ci = torch.tensor(c[i], dtype=torch.float32, device=dev)
        acc = acc + torch.where(valid, ci * x, zero)
        if normalize_coverage:
            cov = cov + torch.where(valid, ci, zero)
    if normalize_coverage:
        acc = torch.where(cov == 0, zero, acc / cov)
    return finish(acc, shape, out_dtype)
