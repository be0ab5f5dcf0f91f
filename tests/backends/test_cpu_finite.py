"""The compiled NaN/Inf check the engine runs on every input agrees with torch.isfinite(t).all()."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.backends import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="pymerge._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [math.nan, -math.nan, math.inf, -math.inf, 65504.0, 3e38, 1e-45, -0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 4095, 4097, 300_001])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_torch_at_every_position(dtype, n, threads):
    cpu.set_num_threads(threads)
    x = torch.randn(n).to(dtype)
    assert cpu.all_finite(x) is True
    for pos in sorted({0, n // 2, n - 1}) if n else []:
        for v in SPECIALS:
            y = x.clone()
            y[pos] = v
            assert cpu.all_finite(y) == bool(torch.isfinite(y).all()), (dtype, n, pos, v)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=200), st.sampled_from(DTYPES))
def test_property(values, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert cpu.all_finite(x) == bool(torch.isfinite(x).all())


def test_non_contiguous_and_bad_input():
    x = torch.randn(64, 64)
    x[3, 5] = math.nan
    assert cpu.all_finite(x.t()) is False
    assert cpu.all_finite(x[:, :5]) is True
    with pytest.raises(ValueError):
        cpu.all_finite(torch.ones(3, dtype=torch.float64))
