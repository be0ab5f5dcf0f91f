"""DARE on the CPU (csrc/cpu/dare.cpp): dare_linear / dare_ties and the Philox keep mask.

Same signatures, argument checks and results (bit for bit) as
pymerge.ops.reference.dare and reference.philox. The keep masks are regenerated
from (seed, name, model index, element index); the "l1" rescale takes one extra pass
for the exact L1 norms, which stores the masks (one bit per element and model)
for the merge pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pymerge.hostmem import empty
from pymerge.backends.cpu._lib import DTYPE_TAGS, fp32, lib
from pymerge.backends.cpu._sparse import buffers
from pymerge.ops.reference._common import check_inputs, per_model, resolve_out_dtype
from pymerge.ops.reference.average import _check_finite_scalar, _check_out_dtype, scale_factor
from pymerge.ops.reference.dare import COMBINE, L1_EPS, _check_rescale
from pymerge.ops.reference.philox import _check_model_index, _check_numel, _check_seed
from pymerge.ops.reference.ties import CONSENSUS, _check_choice

__all__ = ["dare_merge", "dare_keep_mask"]


def _check_density(density) -> float:
    density = float(density)
    if density != density:
        raise ValueError("density is NaN")
    return density


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
    fp32(n1 / n2) of the exact L1 norms unless either is < 1e-7; "inverse_density":
    fp32(1 / min(density, 1)) when density > 0; "none": 1); then linear_combine or the
    TIES steps 2-6, rounded once to out_dtype (default tensors[0].dtype).
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
    bufs = buffers(base, tensors)
    out = empty(tensors[0].shape, dtype=out_dtype)
    if bufs.numel == 0:
        return out

    factors = [1.0] * n
    masks = None
    if rescale == "l1":
        # The norm pass keeps its Philox masks, bit-packed, for the merge pass.
        masks = empty(n * ((bufs.numel + 31) // 32), dtype=torch.int32)
        norms = kernels.dare_l1_norms(*bufs.args(), name_bytes, seed, dens32, masks.data_ptr())
        for i, (n1, n2) in enumerate(norms):
            if n1 >= L1_EPS and n2 >= L1_EPS:
                factors[i] = fp32(n1 / n2)
    elif rescale == "inverse_density":
        factors = [fp32(1.0 / min(d, 1.0)) if d > 0.0 else 1.0 for d in dens]

    kernels.dare_merge(
        out.data_ptr(),
        DTYPE_TAGS[out_dtype],
        *bufs.args(),
        name_bytes,
        seed,
        dens32,
        factors,
        w32,
        combine == "ties",
        scale,
        bool(normalize),
        consensus == "count",
        0 if masks is None else masks.data_ptr(),
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
    model_index), counter = p; see reference.philox.dare_keep_mask. CPU only."""
    kernels = lib()
    density = _check_density(density)
    numel = _check_numel(numel)
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {type(name).__name__}")
    seed = _check_seed(seed)
    model_index = _check_model_index(model_index)
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"dare_keep_mask: the cpu backend makes CPU masks, not {device} ones")
    out = empty(numel, dtype=torch.bool)
    if numel:
        kernels.dare_keep_mask(out.data_ptr(), numel, name.encode("utf-8"), seed, model_index, fp32(density))
    return out
