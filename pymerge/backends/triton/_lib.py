"""Shared plumbing of the triton backend: the kernels package, device checks, scalars.

The kernels live in ``triton_kernels/`` of the source tree, installed as
``pymerge.triton_kernels``; `kernels()` is the only place that imports them,
and triton too.
Both wait for the first op: Triton decides between compiling and
interpreting when its own functions and the kernels are decorated, i.e. on
import, so listing the available backends early must not fix that choice
before TRITON_INTERPRET is set. A kernel module that fails to import is an
error, not a missing backend.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from pymerge.backends._args import fp32 as fp32  # one rounding rule for every backend

_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_kernels = None
_kernels_interpreted = False


def _interpret_env() -> bool:
    # the values Triton's own TRITON_INTERPRET switch accepts
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter, on CPU tensors.

    That is TRITON_INTERPRET=1 as it was when the kernels were imported, or, before
    that, as it is now.
    """
    return _kernels_interpreted if _kernels is not None else _HAVE_TRITON and _interpret_env()


def available() -> bool:
    """True when triton is installed and there is a device to run on: a GPU, or the interpreter."""
    return _HAVE_TRITON and (interpreted() or torch.cuda.is_available())


def kernels():
    """The pymerge.triton_kernels package (imported on first use); RuntimeError when triton is missing."""
    global _kernels, _kernels_interpreted
    if _kernels is None:
        if not _HAVE_TRITON:
            raise RuntimeError("the triton backend needs the triton package (pip install triton)")
        import triton.language.standard
        from triton.runtime.jit import JITFunction

        import pymerge.triton_kernels as triton_kernels
        import pymerge.triton_kernels.average
        import pymerge.triton_kernels.breadcrumbs
        import pymerge.triton_kernels.dare
        import pymerge.triton_kernels.emr
        import pymerge.triton_kernels.histogram
        import pymerge.triton_kernels.pcb
        import pymerge.triton_kernels.permute
        import pymerge.triton_kernels.slerp
        import pymerge.triton_kernels.ties  # noqa: F401  (the op modules reach them as attributes)

        # ask the decorated functions: triton (or the kernels) may have been imported earlier
        mode = not isinstance(triton_kernels.average._weighted_sum_kernel, JITFunction)
        if mode != (not isinstance(triton.language.standard.zeros, JITFunction)):
            raise RuntimeError(
                "triton was imported before TRITON_INTERPRET was set (or changed since): its own functions and "
                "the kernels disagree on interpreting; set TRITON_INTERPRET before anything imports triton"
            )
        _kernels, _kernels_interpreted = triton_kernels, mode
    return _kernels


def check_device(tensors, what: str = "tensors") -> torch.device:
    """The one device of `tensors` (None entries skipped); it must be CUDA, or CPU under TRITON_INTERPRET=1."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: expected torch.Tensor, got {type(t).__name__}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{what}: tensors on {device} and {t.device}; the triton backend needs one device")
    if device is None:
        raise ValueError(f"{what}: no tensor given")
    check_device_type(device, what)
    return device


def check_device_type(device: torch.device | str | None, what: str = "tensors") -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return device
    if device.type == "cpu" and interpreted():
        return device
    raise ValueError(
        f"{what}: the triton backend runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    )


def flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view (or copy) of t's values."""
    return t.detach().contiguous().reshape(-1)


def fp32_tensor(values, device) -> torch.Tensor:
    """Python floats rounded once (nearest-even) to an fp32 tensor on device."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(torch.float32).to(device)
