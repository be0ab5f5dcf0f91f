"""The "cpu" backend: compiled kernels of pymerge._C over CPU tensors.

The extension takes raw buffers (address, element count, dtype tag); this
module checks device, dtype and shape, makes tensors contiguous and passes
``data_ptr()``. Importing it never fails: without the extension,
``available()`` is False and the ops raise RuntimeError.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

try:
    from pymerge import _C
except ImportError as exc:  # not built: the package still imports
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

# Dtype tags of csrc/common/dtype.h.
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """True when the compiled extension pymerge._C imports."""
    return _C is not None


def _lib():
    if _C is None:
        raise RuntimeError(
            "the pymerge CPU kernels (pymerge._C) are not built; build them with "
            f"`pip install -e .` from the source tree (import error: {_IMPORT_ERROR})"
        )
    return _C


def set_num_threads(k: int) -> None:
    """Threads used by the CPU kernels (independent of torch.set_num_threads)."""
    k = int(k)
    if k < 1:
        raise ValueError(f"set_num_threads: k must be >= 1, got {k}")
    _lib().set_num_threads(k)


def get_num_threads() -> int:
    return int(_lib().get_num_threads())


def _fp32(x: float) -> float:
    """x rounded once (nearest-even) to fp32, returned as a Python float.

    Scalars are rounded here, in one place, so that the value the kernel uses
    is exactly torch.tensor(x, dtype=torch.float32): the binding's own
    double -> float conversion is then exact.
    """
    return float(torch.tensor(float(x), dtype=torch.float64).to(torch.float32))


def _tag(t: torch.Tensor, what: str) -> int:
    tag = DTYPE_TAGS.get(t.dtype)
    if tag is None:
        raise ValueError(f"{what}: dtype {t.dtype} is not one of float32, float16, bfloat16")
    return tag


def _check_cpu(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: tensor is on {t.device}, the cpu backend needs CPU tensors")


def _weights(weights, n: int) -> list[float]:
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


def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights=None,
    *,
    base: torch.Tensor | None = None,
    lam: float = 1.0,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """c * sum_i w_i * x_i (+ base), the linear / task_arithmetic primitive.

    x_i = f32(tensors[i]) - f32(base) with a base, else f32(tensors[i]); the sum
    runs in fp32 in model order, acc = acc + w_i * x_i from acc = 0 (products and
    sums rounded separately); out = f32(base) + acc * c with a base, else acc * c;
    rounded once (nearest-even) to out_dtype (default: tensors[0].dtype).

    w_i = fp32(weights[i]) (default 1). c = lam / sum(weights) with normalize,
    else lam, computed in Python floats (float64, over the unrounded weights) and
    then rounded once to fp32. normalize with sum(weights) == 0 is a ValueError.
    """
    lib = _lib()
    tensors = list(tensors)
    n = len(tensors)
    if n == 0:
        raise ValueError("weighted_sum: at least one model tensor is needed")
    for i, t in enumerate(tensors):
        _check_cpu(t, f"model {i}")
    if base is not None:
        _check_cpu(base, "base")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"model {i}: shape {tuple(t.shape)} != {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ValueError(f"base: shape {tuple(base.shape)} != {tuple(shape)}")
    in_tags = [_tag(t, f"model {i}") for i, t in enumerate(tensors)]
    base_tag = _tag(base, "base") if base is not None else 0
    out_dtype = tensors[0].dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")

    w = _weights(weights, n)
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError("weighted_sum: normalize=True needs weights with a nonzero sum")
        c = float(lam) / total
    else:
        c = float(lam)
    w32 = [_fp32(x) for x in w]
    c32 = _fp32(c)

    out = torch.empty(shape, dtype=out_dtype, device="cpu")
    numel = out.numel()
    if numel == 0:
        return out
    # Keep the contiguous copies alive until the kernel has returned.
    inputs = [t.detach().contiguous() for t in tensors]
    base_c = base.detach().contiguous() if base is not None else None
    lib.weighted_sum(
        out.data_ptr(),
        DTYPE_TAGS[out_dtype],
        [t.data_ptr() for t in inputs],
        in_tags,
        base_c.data_ptr() if base_c is not None else 0,
        base_tag,
        numel,
        w32,
        c32,
    )
    return out
