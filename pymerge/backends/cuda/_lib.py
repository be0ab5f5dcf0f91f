"""Shared plumbing of the cuda backend: the extension handle, dtype tags, argument checks, streams.

The extension (pymerge._C_cuda) takes raw device buffers (address, element
count, dtype tag) and the integer handle of the stream to launch on. The op
modules check device, dtype and shape, make tensors contiguous, make the
tensors' device current (`on_device`) and pass ``data_ptr()`` plus
``stream(device)``. Kernels run asynchronously on torch's current stream, so
results follow torch's ordinary stream semantics.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterable

import torch

from pymerge.backends._args import fp32 as fp32  # one rounding rule for every backend

try:
    from pymerge import _C_cuda
except ImportError as exc:  # not built (CPU install): the package still imports
    _C_cuda = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

# Dtype tags of csrc/common/dtype.h.
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Models per call (kMaxModels in csrc/cuda/common.cuh).
MAX_MODELS = 64


def built() -> bool:
    """True when pymerge._C_cuda imports (a GPU is not needed for that)."""
    return _C_cuda is not None


def available() -> bool:
    """True when the extension imports and torch sees a CUDA device."""
    return _C_cuda is not None and torch.cuda.is_available()


def lib():
    if _C_cuda is None:
        raise RuntimeError(
            "the pymerge CUDA kernels (pymerge._C_cuda) are not built; build them with "
            f"`PYMERGE_CUDA=1 pip install -e .` on a machine with nvcc (import error: {_IMPORT_ERROR})"
        )
    return _C_cuda


def tag(t: torch.Tensor, what: str) -> int:
    tag = DTYPE_TAGS.get(t.dtype)
    if tag is None:
        raise ValueError(f"{what}: dtype {t.dtype} is not one of float32, float16, bfloat16")
    return tag


def out_tag(out_dtype: torch.dtype) -> int:
    if out_dtype not in DTYPE_TAGS:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    return DTYPE_TAGS[out_dtype]


def check_cuda(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{what}: tensor is on {t.device}, the cuda backend needs CUDA tensors")


def same_device(named: Iterable[tuple[str, torch.Tensor | None]]) -> torch.device:
    """The one CUDA device of the given tensors (None entries skipped); ValueError otherwise."""
    device = None
    first = None
    for what, t in named:
        if t is None:
            continue
        check_cuda(t, what)
        if device is None:
            device, first = t.device, what
        elif t.device != device:
            raise ValueError(f"{what} is on {t.device} but {first} is on {device}; the cuda backend needs one device")
    if device is None:
        raise ValueError("no tensor given")
    return device


def check_models(n: int) -> None:
    if n > MAX_MODELS:
        raise ValueError(f"the cuda backend merges at most {MAX_MODELS} models per call, got {n}")


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with t's values (t itself when it already is)."""
    return t.detach().contiguous()


def stream(device: torch.device) -> int:
    """The integer handle of torch's current stream on `device` (kernels launch there)."""
    return torch.cuda.current_stream(device).cuda_stream


def on_device(device: torch.device):
    """Make `device` current for the launch (the extension's runtime launches on the current device)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def weights_list(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    if isinstance(weights, numbers.Real):
        return [float(weights)] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"weights: {len(values)} values for {n} models")
    return values


def synchronize(device: torch.device) -> None:
    """Wait for the current stream and raise any asynchronous kernel error (tests, benchmarks)."""
    with on_device(device):
        lib()._synchronize(stream(device))
