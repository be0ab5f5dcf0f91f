"""DARE on the GPU (csrc/cuda/dare.cu): dare_linear / dare_ties and the Philox keep mask.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.dare and reference.philox. The keep masks are regenerated
from (seed, name, model index, element index) in every pass, never stored; the
"l1" rescale takes one extra pass for the exact L1 norms, and its factors stay
on the device (no host round trip).
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.backends.cuda._lib import (
    check_models,
    contiguous,
    fp32,
    lib,
    on_device,
    out_tag,
    same_device,
    stream,
    tag,
)
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, scale_factor
from pymerge.ops.reference.dare import COMBINE, _check_rescale
from pymerge.ops.reference.philox import _check_model_index, _check_numel, _check_seed
from pymerge.ops.reference.ties import CONSENSUS, _check_choice

__all__ = ["dare_merge", "dare_keep_mask"]


def _check_density(density) -> float:
    density = float(density)
    if density != density:
        raise ValueError("density is NaN")
    return density


def _buffers(base: torch.Tensor, tensors: list[torch.Tensor]):
    device = same_device([("base", base)] + [(f"model {i}", t) for i, t in enumerate(tensors)])
    check_models(len(tensors))
    tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    base_tag = tag(base, "base")
    return device, contiguous(base), [contiguous(t) for t in tensors], base_tag, tags


def l1_factors(base, tensors, *, name: str, seed: int, densities, with_norms: bool = False):
    """Device fp32 [N] rescale factors of the "l1" rule (and, with_norms, the exact fp64 norms [N, 2])."""
    kernels = lib()
    tensors = list(tensors)
    device, base_c, inputs, base_tag, tags = _buffers(base, tensors)
    n = len(tensors)
    dens32 = [fp32(_check_density(d)) for d in per_model(densities, n, "densities")]
    hist = torch.zeros((n, 2, kernels.DARE_HIST_BINS), dtype=torch.int64, device=device)
    factors = torch.empty(n, dtype=torch.float32, device=device)
    norms = torch.empty((n, 2), dtype=torch.float64, device=device) if with_norms else None
    with on_device(device):
        kernels.dare_l1_factors([t.data_ptr() for t in inputs], tags, base_c.data_ptr(), base_tag, base_c.numel(),
                                name.encode("utf-8"), _check_seed(seed), dens32, hist.data_ptr(),
                                factors.data_ptr(), norms.data_ptr() if norms is not None else 0, stream(device))
    return (factors, norms) if with_norms else factors


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
    """dare_linear (combine="linear") and dare_ties (combine="ties"); see
    reference.dare.dare_merge.

    tau_hat_i = keep_i ? fp32(tau_i * f_i) : +0 with keep_i the Philox mask of
    (name, seed, i) at fp32(density_i) and f_i the fp32 rescale factor ("l1":
    fp32(n1 / n2) of the exact L1 norms unless either is < 1e-7, computed on the
    device; "inverse_density": fp32(1 / min(density, 1)) when density > 0;
    "none": 1); then linear_combine or the TIES steps 2-6, rounded once to
    out_dtype (default tensors[0].dtype).
    """
    kernels = lib()
    if base is None:
        raise ValueError("dare_merge needs a base tensor")
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    rescale = _check_rescale(rescale)
    combine = _check_choice(combine, COMBINE, "combine")
    consensus = _check_choice(consensus, CONSENSUS, "consensus")
    tensors = list(tensors)
    check_inputs(tensors, base)
    out_dtype = _check_out_dtype(resolve_out_dtype(tensors, out_dtype))
    n = len(tensors)
    dens = [_check_density(d) for d in per_model(densities, n, "densities")]
    seed = _check_seed(seed)
    name_bytes = name.encode("utf-8")
    w = per_model(weights, n, "weights")
    for wi in w:
        _check_finite_scalar(wi, "weight")
    if combine == "linear":
        scale = scale_factor(w, lam, normalize)  # fp32 c; raises for normalize with sum 0
    else:
        scale = fp32(_check_finite_scalar(lam, "lam"))
    w32 = [fp32(wi) for wi in w]
    dens32 = [fp32(d) for d in dens]
    device, base_c, inputs, base_tag, tags = _buffers(base, tensors)
    o_tag = out_tag(out_dtype)
    out = torch.empty(tensors[0].shape, dtype=out_dtype, device=device)
    if base_c.numel() == 0:
        return out

    factors = [1.0] * n
    dev_factors = None
    if rescale == "l1":
        dev_factors = l1_factors(base_c, inputs, name=name, seed=seed, densities=dens32)
    elif rescale == "inverse_density":
        factors = [fp32(1.0 / min(d, 1.0)) if d > 0.0 else 1.0 for d in dens]

    with on_device(device):
        kernels.dare_merge(
            out.data_ptr(), o_tag, [t.data_ptr() for t in inputs], tags, base_c.data_ptr(), base_tag, base_c.numel(),
            name_bytes, seed, dens32, factors, dev_factors.data_ptr() if dev_factors is not None else 0, w32,
            combine == "ties", scale, bool(normalize), consensus == "count", stream(device),
        )
    return out


def dare_keep_mask(
    numel: int,
    *,
    name: str,
    seed: int,
    model_index: int,
    density: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """keep_p = u_p < fp32(density), u from Philox 4x32-10 keyed by (name, seed,
    model_index), counter = p; see reference.philox.dare_keep_mask. CUDA devices only
    (device None: the current CUDA device)."""
    kernels = lib()
    density = _check_density(density)
    numel = _check_numel(numel)
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    seed = _check_seed(seed)
    model_index = _check_model_index(model_index)
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise ValueError(f"dare_keep_mask: the cuda backend makes CUDA masks, not {device} ones")
    out = torch.empty(numel, dtype=torch.bool, device=device)
    if numel:
        with on_device(out.device):
            kernels.dare_keep_mask(out.data_ptr(), numel, name.encode("utf-8"), seed, model_index, fp32(density),
                                   stream(out.device))
    return out
