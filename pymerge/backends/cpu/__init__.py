"""The "cpu" backend: the compiled kernels of pymerge._C on CPU tensors.

One module per op family (mirroring csrc/cpu); every public name in a module's
``__all__`` is an op of this backend. Importing never fails: without the
extension, ``available()`` is False and the ops raise RuntimeError.
"""

from __future__ import annotations

import importlib
import pkgutil

from pymerge.backends.cpu._lib import _C, lib


def available() -> bool:
    """True when the compiled extension pymerge._C imports."""
    return _C is not None


def set_num_threads(k: int) -> None:
    """Threads used by the CPU kernels (independent of torch.set_num_threads)."""
    k = int(k)
    if k < 1:
        raise ValueError(f"set_num_threads: k must be >= 1, got {k}")
    lib().set_num_threads(k)


def get_num_threads() -> int:
    return int(lib().get_num_threads())


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in _module.__all__:
            globals()[_name] = getattr(_module, _name)
