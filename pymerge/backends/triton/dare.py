"""DARE with the Triton kernels (triton_kernels/dare.py): dare_linear, dare_ties and the keep mask."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.triton._lib import check_device, check_device_type, flat, fp32, fp32_tensor, kernels
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, scale_factor
from pymerge.ops.reference.dare import COMBINE, L1_EPS, _check_rescale
from pymerge.ops.reference.philox import _check_numel, dare_key64
from pymerge.ops.reference.ties import CONSENSUS, _check_choice

__all__ = ["dare_merge", "dare_keep_mask"]


def _keys(name: str, seed: int, n_models: int, device) -> torch.Tensor:
    """key64 of each model as int64 bit patterns (the kernels reinterpret them as uint64)."""
    keys = [dare_key64(name, seed, i) for i in range(n_models)]
    return torch.tensor([k - (1 << 64) if k >= 1 << 63 else k for k in keys], dtype=torch.int64, device=device)


def _check_density(d: float) -> float:
    d = float(d)
    if d != d:
        raise ValueError("density is NaN")
    return d


def dare_keep_mask(
    numel: int,
    *,
    name: str,
    seed: int,
    model_index: int,
    density: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Same contract as pymerge.ops.reference.dare_keep_mask; the same mask bit for bit."""
    k = kernels()
    numel = _check_numel(numel)
    key64 = dare_key64(name, seed, model_index)  # validates name, seed, model_index
    density = _check_density(density)
    device = check_device_type(device, "dare_keep_mask")
    keep = torch.empty(numel, dtype=torch.bool, device=device)
    key = torch.tensor([key64 - (1 << 64) if key64 >= 1 << 63 else key64], dtype=torch.int64, device=device)
    k.dare.keep_mask(keep, key, fp32_tensor([density], device))
    return keep


def dare_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights=None,
    densities=1.0,
    *,
    name: str,
    seed: int = 0,
    lam: float = 1.0,
    normalize: bool = False,
    rescale="l1",
    combine: str = "linear",
    consensus: str = "sum",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as pymerge.ops.reference.dare_merge.

    Bit-identical to the reference for rescale "none" / "inverse_density"; with "l1"
    too, unless a model's factor n1 / n2 lies within ~2^-44 (relative, up to 2^28
    elements) of an fp32 rounding midpoint: then the factor is one fp32 ulp off
    (see triton_kernels/dare.py).
    """
    k = kernels()
    if base is None:
        raise ValueError("dare_merge needs a base tensor")
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    rescale = _check_rescale(rescale)
    combine = _check_choice(combine, COMBINE, "combine")
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    tensors = list(tensors)
    check_inputs(tensors, base)
    device = check_device(tensors + [base])
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    n = len(tensors)
    dens = [_check_density(d) for d in per_model(densities, n, "densities")]
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    if combine == "linear":
        scale = scale_factor(w, lam, normalize)
    else:
        scale = fp32(_check_finite_scalar(lam, "lam"))
    keys = _keys(name, seed, n, device)  # validates seed
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out

    b = flat(base)
    xs = [flat(t) for t in tensors]
    dens32 = fp32_tensor(dens, device)
    if rescale == "l1":
        factors = k.dare.l1_factors(b, xs, keys, dens32, L1_EPS)
    elif rescale == "inverse_density":
        factors = fp32_tensor([1.0 / min(d, 1.0) if d > 0.0 else 1.0 for d in dens], device)
    else:
        factors = torch.ones(n, dtype=torch.float32, device=device)
    k.dare.merge(
        out.view(-1),
        b,
        xs,
        keys,
        dens32,
        factors,
        fp32_tensor(w, device),
        scale,
        ties=combine == "ties",
        count_consensus=consensus == "count",
        normalize=normalize,
    )
    return out
