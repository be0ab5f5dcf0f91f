"""Shared plumbing of the cpu backend: the extension handle, dtype tags, argument checks.

The extension takes raw buffers (address, element count, dtype tag); the op
modules check device, dtype and shape, make tensors contiguous and pass
``data_ptr()``.
"""

from __future__ import annotations

import numbers

import torch

from pymerge.backends._args import fp32 as fp32  # one rounding rule for every backend

try:
    from pymerge import _C
except ImportError as exc:  # not built: the package still imports
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

# Dtype tags of csrc/common/dtype.h.
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def lib():
    if _C is None:
        raise RuntimeError(
            "the pymerge CPU kernels (pymerge._C) are not built; build them with "
            f"`pip install -e .` from the source tree (import error: {_IMPORT_ERROR})"
        )
    return _C


def tag(t: torch.Tensor, what: str) -> int:
    tag = DTYPE_TAGS.get(t.dtype)
    if tag is None:
        raise ValueError(f"{what}: dtype {t.dtype} is not one of float32, float16, bfloat16")
    return tag


def check_cpu(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: tensor is on {t.device}, the cpu backend needs CPU tensors")


def weights_list(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().tolist()  # a 0-d tensor becomes a scalar
    if isinstance(weights, numbers.Real):
        return [float(weights)] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"weights: {len(values)} values for {n} models")
    return values
