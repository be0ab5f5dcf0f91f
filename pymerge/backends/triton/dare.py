"""DARE with the Triton kernels (triton_kernels/dare.py): dare_linear, dare_ties and the keep mask."""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.triton._lib import check_device, check_device_type, flat, fp32_tensor, kernels
from pymerge.backends._args import check_density, dare_args
from pymerge.ops.reference.dare import L1_EPS
from pymerge.ops.reference.philox import _check_numel, dare_key64

__all__ = ["dare_merge", "dare_keep_mask"]


def _keys(name: str, seed: int, n_models: int, device) -> torch.Tensor:
    """key64 of each model as int64 bit patterns (the kernels reinterpret them as uint64)."""
    keys = [dare_key64(name, seed, i) for i in range(n_models)]
    return torch.tensor([k - (1 << 64) if k >= 1 << 63 else k for k in keys], dtype=torch.int64, device=device)


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
    density = check_density(density)
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
    a = dare_args(base, tensors, weights, densities, name=name, seed=seed, lam=lam, normalize=normalize,
                  rescale=rescale, combine=combine, consensus=consensus, out_dtype=out_dtype)
    n = len(a.tensors)
    device = check_device(a.tensors + [base])
    keys = _keys(a.name, a.seed, n, device)
    out = torch.empty(a.tensors[0].shape, dtype=a.out_dtype, device=device)
    if out.numel() == 0:
        return out

    b = flat(base)
    xs = [flat(t) for t in a.tensors]
    dens32 = fp32_tensor(a.densities32, device)
    if a.rescale == "l1":
        factors = k.dare.l1_factors(b, xs, keys, dens32, L1_EPS)
    elif a.rescale == "inverse_density":
        factors = fp32_tensor(a.inverse_density_factors(), device)
    else:
        factors = torch.ones(n, dtype=torch.float32, device=device)
    k.dare.merge(
        out.view(-1),
        b,
        xs,
        keys,
        dens32,
        factors,
        fp32_tensor(a.weights, device),
        a.scale,
        ties=a.combine_ties,
        count_consensus=a.count_consensus,
        normalize=a.normalize,
    )
    return out
