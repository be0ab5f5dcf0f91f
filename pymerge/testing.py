"""Assertions for kernel tests: the project's backends promise bit-identical results."""

from __future__ import annotations

import threading
from typing import Callable

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


def run_in_threads(fn: Callable[[int], None], n: int) -> None:
    """Run fn(0) .. fn(n - 1) on n threads at once; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
