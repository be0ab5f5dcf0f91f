"""Streaming stores (csrc/common/stream.h): every kernel that streams large outputs gives the
same bits as with plain stores. The size threshold is lowered to 0 so that small tensors,
with partial blocks and chunks, take the streamed path."""

from __future__ import annotations

import pytest
import torch

from pymerge.backends import cpu
from pymerge.ops import reference
from pymerge.testing import assert_bits_equal

from .cases import CPU, DTYPES, models

pytestmark = CPU.marks

SIZES = [1, 1000, 3 * (1 << 16) + 1024 // 2 + 7]


@pytest.fixture(autouse=True)
def _stream_everything():
    from pymerge import _C

    before = _C._set_stream_min_bytes(0)
    yield
    _C._set_stream_min_bytes(before)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_average_ties_breadcrumbs_dare(size, out_dtype, threads):
    cpu.set_num_threads(threads)
    gen = torch.Generator().manual_seed(size + threads)
    base, ts = models(size, [torch.bfloat16, torch.float16, torch.float32], gen)
    w, d = [0.5, -1.0, 0.75], [0.3, 0.6, 0.9]
    kw = dict(out_dtype=out_dtype)
    assert_bits_equal(cpu.weighted_sum(ts, w, base=base, lam=0.9, **kw),
                      reference.weighted_sum(ts, w, base=base, lam=0.9, **kw))
    assert_bits_equal(cpu.ties_merge(base, ts, w, d, **kw), reference.ties_merge(base, ts, w, d, **kw))
    assert_bits_equal(cpu.breadcrumbs_merge(base, ts, w, d, 0.05, combine="ties", **kw),
                      reference.breadcrumbs_merge(base, ts, w, d, 0.05, combine="ties", **kw))
    assert_bits_equal(cpu.dare_merge(base, ts, w, d, name="x", seed=3, **kw),
                      reference.dare_merge(base, ts, w, d, name="x", seed=3, **kw))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_emr_reconstruct(size, out_dtype):
    gen = torch.Generator().manual_seed(size)
    base, ts = models(size, [torch.bfloat16, torch.bfloat16], gen)
    e = cpu.emr_elect(base, ts)
    got = cpu.emr_reconstruct(base, e.u, e.masks[1], 0.7, out_dtype=out_dtype)
    assert_bits_equal(got, reference.emr_reconstruct(base, e.u, e.masks[1], 0.7, out_dtype=out_dtype))


@pytest.mark.parametrize("shift", [1, 3, 17])
def test_unaligned_output(shift):
    # Outputs that start off a 32-byte boundary: the copy's head and tail go through plain stores.
    from pymerge import _C

    gen = torch.Generator().manual_seed(shift)
    n = 5000 + shift
    xs = [torch.randn(n, generator=gen).bfloat16() for _ in range(2)]
    buf = torch.full((n + 64,), -1.0).bfloat16()
    _C.weighted_sum(buf.data_ptr() + 2 * shift, 2, [x.data_ptr() for x in xs], [2, 2], 0, 0, n, [1.0, -0.5], 1.0)
    assert_bits_equal(buf[shift:shift + n], reference.weighted_sum(xs, [1.0, -0.5]))
    assert bool((buf[:shift] == -1).all()) and bool((buf[shift + n:] == -1).all())
