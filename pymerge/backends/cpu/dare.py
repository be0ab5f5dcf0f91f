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
from pymerge.backends._args import check_density, dare_args
from pymerge.ops.reference.dare import L1_EPS
from pymerge.ops.reference.philox import _check_model_index, _check_numel, _check_seed

__all__ = ["dare_merge", "dare_keep_mask"]


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
    a = dare_args(base, tensors, weights, densities, name=name, seed=seed, lam=lam, normalize=normalize,
                  rescale=rescale, combine=combine, consensus=consensus, out_dtype=out_dtype)
    n = len(a.tensors)
    bufs = buffers(base, a.tensors)
    out = empty(a.tensors[0].shape, dtype=a.out_dtype)
    if bufs.numel == 0:
        return out

    name_bytes = a.name.encode("utf-8")
    factors = [1.0] * n
    masks = None
    if a.rescale == "l1":
        # The norm pass keeps its Philox masks, bit-packed, for the merge pass.
        masks = empty(n * ((bufs.numel + 31) // 32), dtype=torch.int32)
        norms = kernels.dare_l1_norms(*bufs.args(), name_bytes, a.seed, a.densities32, masks.data_ptr())
        for i, (n1, n2) in enumerate(norms):
            if n1 >= L1_EPS and n2 >= L1_EPS:
                factors[i] = fp32(n1 / n2)
    elif a.rescale == "inverse_density":
        factors = a.inverse_density_factors()

    kernels.dare_merge(
        out.data_ptr(),
        DTYPE_TAGS[a.out_dtype],
        *bufs.args(),
        name_bytes,
        a.seed,
        a.densities32,
        factors,
        a.weights,
        a.combine_ties,
        a.scale,
        a.normalize,
        a.count_consensus,
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
    density = check_density(density)
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
