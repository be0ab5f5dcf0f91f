"""The "triton" backend: the Triton kernels of triton_kernels, on CUDA tensors.

With TRITON_INTERPRET=1 (set before triton is first imported) the kernels run
in Triton's interpreter on CPU tensors instead: that is how CI tests them.
One module per op family (mirroring triton_kernels); every public name in a
module's ``__all__`` is an op of this backend. Importing never fails: without
triton, ``available()`` is False and the ops raise RuntimeError.
"""

from __future__ import annotations

import importlib
import pkgutil

from pymerge.backends.triton._lib import available as available, interpreted as interpreted

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        for _name in _module.__all__:
            globals()[_name] = getattr(_module, _name)
