"""The cuda backend's binding layer; runs without a GPU.

Without pymerge._C_cuda (a CPU install) only the import contract is checked:
the backend imports, is unavailable, and the ops say why.
"""

from __future__ import annotations

import pytest
import torch

import pymerge.ops
from pymerge import backends
from pymerge.backends import cuda
from pymerge.backends.cuda import _lib

OPS = ["weighted_sum", "dare_merge", "dare_keep_mask", "slerp", "permute_average", "emr_elect", "emr_reconstruct",
       "pack_bits", "unpack_bits"]

needs_build = pytest.mark.skipif(not cuda.built(), reason="pymerge._C_cuda is not built (PYMERGE_CUDA=1)")


def test_backend_imports_and_exposes_ops():
    for op in OPS:
        assert callable(getattr(cuda, op)), op
    assert cuda.available() == (cuda.built() and torch.cuda.is_available())
    assert ("cuda" in backends.available()) == cuda.available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_unavailable_backend_is_reported():
    with pytest.raises((RuntimeError, ValueError)):
        pymerge.ops.weighted_sum([torch.ones(3)], backend="cuda")
    # auto never picks it for CPU tensors
    pymerge.ops.weighted_sum([torch.ones(3)])
    assert pymerge.ops.last_backend() != "cuda"


@needs_build
def test_module_imports_without_gpu():
    from pymerge import _C_cuda

    for name in ["weighted_sum", "dare_merge", "dare_l1_factors", "dare_keep_mask", "slerp_row_stats",
                 "slerp_combine", "permute_average", "emr_elect", "emr_reconstruct", "pack_bits", "unpack_bits",
                 "device_count", "sm_count", "_synchronize"]:
        assert hasattr(_C_cuda, name), name
    assert (_C_cuda.FLOAT32, _C_cuda.FLOAT16, _C_cuda.BFLOAT16) == (0, 1, 2)
    assert _C_cuda.device_count() >= 0
    assert _C_cuda.CUDART_VERSION >= 11000


@needs_build
def test_wrappers_reject_cpu_tensors():
    x = torch.ones(16)
    w = torch.zeros(1, dtype=torch.int32)
    calls = [
        lambda: cuda.weighted_sum([x, x]),
        lambda: cuda.weighted_sum([x], base=x),
        lambda: cuda.dare_merge(x, [x], name="t"),
        lambda: cuda.slerp(x, x, 0.5),
        lambda: cuda.permute_average([x], 1.0),
        lambda: cuda.emr_elect(x, [x]),
        lambda: cuda.emr_reconstruct(x, x, w, 1.0),
        lambda: cuda.pack_bits(x > 0),
        lambda: cuda.unpack_bits(w, 16),
        lambda: cuda.dare_keep_mask(4, name="t", seed=0, model_index=0, density=0.5, device="cpu"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="(?i)cuda"):
            call()


@needs_build
def test_binding_argument_checks_need_no_gpu():
    from pymerge import _C_cuda

    # every check below fails before anything touches the device
    with pytest.raises(ValueError, match="dtype tag"):
        _C_cuda.weighted_sum(1 << 20, 7, [1 << 20], [0], 0, 0, 4, [1.0], 1.0, 0)
    with pytest.raises(ValueError, match="at least one"):
        _C_cuda.weighted_sum(1 << 20, 0, [], [], 0, 0, 4, [], 1.0, 0)
    with pytest.raises(ValueError, match="null pointer"):
        _C_cuda.weighted_sum(0, 0, [1 << 20], [0], 0, 0, 4, [1.0], 1.0, 0)
    with pytest.raises(ValueError, match="overlaps"):
        _C_cuda.weighted_sum(1 << 20, 0, [(1 << 20) + 4], [0], 0, 0, 4, [1.0], 1.0, 0)
    with pytest.raises(ValueError, match="at most"):
        _C_cuda.weighted_sum(1 << 20, 0, [1 << 30] * 65, [0] * 65, 0, 0, 4, [1.0] * 65, 1.0, 0)
    with pytest.raises(ValueError, match="negative"):
        _C_cuda.slerp_combine(1, 0, 1, 0, 1, 0, -1, 4, 1, 1, 0)
    with pytest.raises(ValueError, match="differ in length"):
        _C_cuda.dare_merge(1 << 20, 0, [1 << 24], [0], 1 << 28, 0, 4, b"t", 0, [0.5, 0.5], [1.0], 0, [1.0],
                           False, 1.0, False, False, 0)
    # empty work launches nothing
    _C_cuda.weighted_sum(0, 0, [0], [0], 0, 0, 0, [1.0], 1.0, 0)
    _C_cuda.emr_reconstruct(0, 0, 0, 0, 0, 0, 0, 0, 1.0, 0)
    assert _C_cuda.emr_elect_blocks(1) == 1 and _C_cuda.slerp_segments(8193) == 2
    assert _C_cuda.DARE_HIST_BINS == 257


def test_lib_helpers():
    assert _lib.fp32(0.1) == float(torch.tensor(0.1, dtype=torch.float32))
    assert _lib.weights_list(None, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="weights"):
        _lib.weights_list([1.0], 2)
    with pytest.raises(ValueError, match="at most"):
        _lib.check_models(_lib.MAX_MODELS + 1)
    with pytest.raises(ValueError, match="cuda backend needs CUDA"):
        _lib.same_device([("a", torch.ones(1))])
