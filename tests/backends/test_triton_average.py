"""Triton weighted_sum against the torch reference, bit for bit (TRITON_INTERPRET=1 on CPU; see conftest)."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from pymerge import backends, ops  # noqa: E402
from pymerge.backends import triton as tb  # noqa: E402
from pymerge.ops import reference  # noqa: E402
from pymerge.testing import assert_bits_equal  # noqa: E402

from .cases import DTYPES, TRITON  # noqa: E402

pytestmark = TRITON.marks

DEVICE = TRITON.device
BLOCK = 1024  # triton_kernels.average.BLOCK_SIZE
SIZES = [0, 1, 7, 1000, 2 * BLOCK + 77]


def run(tensors, weights=None, base=None, **kw):
    """The triton op on DEVICE copies, the result back on the CPU."""
    tensors = [t.to(DEVICE) for t in tensors]
    base = base.to(DEVICE) if base is not None else None
    return tb.weighted_sum(tensors, weights, base=base, **kw).cpu()


def rand(shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_reference(size, with_base):
    for in_dtype, out_dtype in itertools.product(DTYPES, DTYPES):
        gen = torch.Generator().manual_seed(size * 9 + DTYPES.index(in_dtype) * 3 + DTYPES.index(out_dtype))
        base = rand(size, in_dtype, gen, offset=0.5) if with_base else None
        # fine-tunes close to the base, as in practice (cancellation in x_i - base)
        near = base if with_base else rand(size, in_dtype, gen)
        tensors = [(near.float() + 0.01 * torch.randn(size, generator=gen)).to(in_dtype) for _ in range(3)]
        weights = [0.3, -0.7, 1.25]
        ref = reference.weighted_sum(tensors, weights, base=base, lam=0.8, out_dtype=out_dtype)
        assert_bits_equal(run(tensors, weights, base, lam=0.8, out_dtype=out_dtype), ref)


@pytest.mark.parametrize("n_models", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_mixed_input_dtypes(n_models, with_base, normalize):
    gen = torch.Generator().manual_seed(100 + n_models)
    size = BLOCK + 300
    tensors = [rand(size, DTYPES[(i + 1) % 3], gen) for i in range(n_models)]
    base = rand(size, torch.bfloat16, gen) if with_base else None
    weights = [(-1) ** i * (0.5 + i / 3) for i in range(n_models)]
    for out_dtype in DTYPES:
        ref = reference.weighted_sum(tensors, weights, base=base, lam=1.5, normalize=normalize, out_dtype=out_dtype)
        assert_bits_equal(run(tensors, weights, base, lam=1.5, normalize=normalize, out_dtype=out_dtype), ref)


def test_special_values():
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-40, 6e-8, 65504.0, 3e38]
    vals = torch.tensor(specials, dtype=torch.float32)
    a = vals.repeat(len(specials))
    b = vals.repeat_interleave(len(specials))
    for weights, base in [([1.0, 1.0], None), ([0.0, -1.0], None), ([1.0, -0.0], a), ([2.0, 0.5], b)]:
        for out_dtype in DTYPES:
            for pair in ([a, b], [a.to(torch.float16), b.to(torch.bfloat16)]):
                ref = reference.weighted_sum(pair, weights, base=base, out_dtype=out_dtype)
                assert_bits_equal(run(pair, weights, base, out_dtype=out_dtype), ref)


def test_bf16_rounding_and_widening_exhaustive():
    # Every bf16 pattern widens exactly; fp32 patterns round to nearest-even (ties both
    # ways, carries into the exponent, overflow to inf, subnormals, NaN).
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert_bits_equal(run([every_bf16], out_dtype=torch.float32), reference.weighted_sum([every_bf16], out_dtype=torch.float32))
    gen = torch.Generator().manual_seed(7)
    hi = torch.randint(0, 2**16, (4096,), generator=gen, dtype=torch.int64)
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    patterns = ((hi[:, None] << 16) | lows[None, :]).reshape(-1)
    x = torch.where(patterns >= 2**31, patterns - 2**32, patterns).to(torch.int32).view(torch.float32)
    for out_dtype in (torch.bfloat16, torch.float16):
        assert_bits_equal(run([x], out_dtype=out_dtype), reference.weighted_sum([x], out_dtype=out_dtype))


def test_scalars_rounded_once_to_fp32():
    # 1/3 and 0.1 are not fp32 values: the kernel must use their nearest fp32
    x = torch.tensor([3.0, 1.0, 1e8, 7.0], dtype=torch.float32)
    assert_bits_equal(run([x, x, x], [0.1, 0.1, 0.1], normalize=True), reference.weighted_sum([x, x, x], [0.1] * 3, normalize=True))
    assert_bits_equal(run([x], [1.0], lam=1 / 3), x * torch.tensor(1 / 3, dtype=torch.float32))


def test_shapes_and_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    a = rand((64, 48), torch.bfloat16, gen).t()
    b = rand((64, 96), torch.float16, gen)[:, ::2].t()
    base = rand((48, 64), torch.float32, gen)
    got = run([a, b], [0.5, 0.5], base)
    assert got.is_contiguous() and got.shape == (48, 64)
    assert_bits_equal(got, reference.weighted_sum([a, b], [0.5, 0.5], base=base))
    scalar = torch.tensor(2.5)
    assert_bits_equal(run([scalar, scalar], [1.0, 2.0]), reference.weighted_sum([scalar, scalar], [1.0, 2.0]))


def test_through_ops_and_selection():
    x = torch.randn(100, device=DEVICE)
    got = ops.weighted_sum([x, x], [0.5, 0.25], backend="triton")
    assert ops.last_backend() == "triton"
    assert_bits_equal(got.cpu(), reference.weighted_sum([x.cpu(), x.cpu()], [0.5, 0.25]))
    # auto on CPU tensors never picks triton, even in interpreter mode
    ops.weighted_sum([x.cpu()], backend="auto")
    assert ops.last_backend() in ("cpu", "torch")
    assert "triton" in backends.available()


def test_errors():
    x = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="sum to 0"):
        tb.weighted_sum([x, x], [1.0, -1.0], normalize=True)
    with pytest.raises(ValueError, match="shape"):
        tb.weighted_sum([x, torch.ones(5, device=DEVICE)])
    with pytest.raises(ValueError, match="dtype"):
        tb.weighted_sum([x, torch.ones(4, dtype=torch.float64, device=DEVICE)])
    with pytest.raises(ValueError, match="out_dtype"):
        tb.weighted_sum([x], out_dtype=torch.int32)
    with pytest.raises(ValueError, match="weights"):
        tb.weighted_sum([x, x], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        tb.weighted_sum([])
    with pytest.raises(ValueError, match="finite"):
        tb.weighted_sum([x], [float("nan")])
    with pytest.raises(ValueError, match="triton backend"):
        tb.weighted_sum([torch.ones(4, device="meta")])
