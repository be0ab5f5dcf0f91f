"""Assertions for kernel tests: the project's backends promise bit-identical results."""

from __future__ import annotations

import torch

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bits_equal(actual: torch.Tensor, ref: torch.Tensor) -> None:
    """Same dtype, shape and bits (signed zeros included); any NaN matches any NaN."""
    assert actual.dtype == ref.dtype and actual.shape == ref.shape, (actual.dtype, actual.shape, ref.dtype, ref.shape)
    bits = _BITS[actual.dtype]
    a, r = actual.reshape(-1), ref.reshape(-1)
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(a), nan), "NaNs differ"
    bad = ((a.view(bits) != r.view(bits)) & ~nan).nonzero()
    if bad.numel():
        p = int(bad[0])
        raise AssertionError(f"{bad.numel()} of {r.numel()} elements differ; first at {p}: {a[p].item()!r} != {r[p].item()!r}")
