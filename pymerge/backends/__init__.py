"""Backend selection: which implementation of an op runs for a given device.

Backends: "torch" (the reference, any device), "cpu" (pymerge._C), "cuda"
(pymerge._C_cuda) and "triton". Each backend module exposes `available()` and
functions named like the ops it implements. "auto" picks the compiled kernel
for the tensors' device when it is built, else Triton on a GPU, else torch.
The choice is recorded so that callers (benchmarks, reports) can see it.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

BACKENDS = ("torch", "cpu", "cuda", "triton")
CHOICES = ("auto",) + BACKENDS
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}

log = logging.getLogger("pymerge.backends")
_state = threading.local()
_modules: dict[str, ModuleType | None] = {}


def _module(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"pymerge.backends.{name}")
        except ImportError:
            _modules[name] = None
    mod = _modules[name]
    # asked each time: triton becomes available on CPU once TRITON_INTERPRET is set
    return mod if mod is not None and mod.available() else None


def available() -> list[str]:
    """The backends that can run here."""
    return [b for b in BACKENDS if _module(b) is not None]


def implements(backend: str, op: str) -> bool:
    mod = _module(backend)
    return mod is not None and callable(getattr(mod, op, None))


def select(op: str, backend: str, device_type: str) -> tuple[str, object]:
    """The (backend name, function) that runs `op` on tensors of `device_type`."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(CHOICES)}, not {backend!r}")
    if backend == "auto":
        for name in _AUTO_ORDER.get(device_type, ("torch",)):
            if implements(name, op):
                break
    else:
        name = backend
        if _module(name) is None:
            raise RuntimeError(f"backend {name!r} is not available here (available: {', '.join(available())})")
        if not implements(name, op):
            raise NotImplementedError(f"backend {name!r} has no kernel for {op}")
        if name == "triton" and device_type == "cpu" and _module(name).interpreted():
            pass  # TRITON_INTERPRET=1 runs the kernels on CPU tensors (how CI tests them)
        elif name in ("cuda", "triton") and device_type != "cuda":
            raise ValueError(f"backend {name!r} needs CUDA tensors, got {device_type} tensors")
        if name == "cpu" and device_type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got {device_type} tensors")
    _state.last = name
    log.debug("%s -> %s", op, name)
    return name, getattr(_module(name), op)


def last_backend() -> str | None:
    """The backend that ran the most recent op in this thread."""
    return getattr(_state, "last", None)
