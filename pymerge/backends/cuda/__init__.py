"""The "cuda" backend: the compiled CUDA kernels of pymerge._C_cuda on CUDA tensors.

One module per op family (mirroring csrc/cuda); every public name in a
module's ``__all__`` is an op of this backend. Importing never fails: without
the extension, or without a GPU, ``available()`` is False and the ops raise.
Kernels launch on torch's current stream of the tensors' device.
"""

from __future__ import annotations

import importlib
import pkgutil

from pymerge.backends.cuda._lib import available as available, built as built

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in _module.__all__:
            globals()[_name] = getattr(_module, _name)
