"""weighted_sum: linear and task arithmetic, exact fp32 op order and one output rounding."""

import struct

import pytest
import torch

from pymerge.ops.reference.average import linear_combine, weighted_sum


def _f(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def _from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_linear_normalized():
    out = weighted_sum([_f(1.0, 2.0), _f(3.0, 4.0)], [1.0, 3.0], normalize=True)
    # (1*1 + 3*3) / 4, (1*2 + 3*4) / 4
    _exact(out, _f(2.5, 3.5))


def test_linear_unnormalized_and_default_weights():
    _exact(weighted_sum([_f(1.0, 2.0), _f(3.0, 4.0)]), _f(4.0, 6.0))
    _exact(weighted_sum([_f(1.0), _f(3.0)], [2.0, -1.0]), _f(-1.0))


def test_task_arithmetic():
    base = _f(1.0, 2.0)
    out = weighted_sum([_f(2.0, 2.0), _f(1.0, 4.0)], base=base, lam=0.5)
    # tau = [1, 0], [0, 2]; base + 0.5 * [1, 2]
    _exact(out, _f(1.5, 3.0))
    out = weighted_sum([_f(2.0, 2.0), _f(1.0, 4.0)], [1.0, 3.0], base=base, normalize=True)
    # base + ([1, 0] + [0, 6]) * fp32(1/4)
    _exact(out, _f(1.25, 3.5))


def test_sequential_accumulation_order():
    tiny = 2.0**-24
    # ((0 + 1) + 2^-24) + 2^-24 == 1 (each add ties to even); any other order gives 1 + 2^-23
    out = weighted_sum([_f(1.0), _f(tiny), _f(tiny)])
    _exact(out, _f(1.0))
    out = weighted_sum([_f(tiny), _f(tiny), _f(1.0)])
    _exact(out, _f(1.0 + 2.0**-23))


def test_product_rounded_before_add_no_fma():
    a = 1.0 + 2.0**-12
    # a*a = 1 + 2^-11 + 2^-24 rounds (tie, even) to 1 + 2^-11; adding -(1 + 2^-11) gives 0.
    # A fused multiply-add would give 2^-24.
    out = weighted_sum([_f(-(1.0 + 2.0**-11)), _f(a)], [1.0, a])
    _exact(out, _f(0.0))


def test_scale_is_fp32_of_float64_quotient_then_multiplied():
    # c = fp32(1/3); 5 * c rounds to 0x3FD55556, whereas 5 / 3 would round to 0x3FD55555
    out = weighted_sum([_f(5.0), _f(0.0)], [1.0, 2.0], normalize=True)
    _exact(out, _f(_from_bits(0x3FD55556)))
    # lam / sum in float64: 0.1 / 0.1 == 1 exactly, never fp32(0.1) / fp32(0.1)-ish drift
    out = weighted_sum([_f(3.0)], [0.1], lam=0.1, normalize=True)
    # acc = fp32(0.1) * 3, times c = 1
    _exact(out, torch.tensor(0.1, dtype=torch.float32).reshape(1) * 3)


def test_normalize_zero_sum_raises():
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_sum([_f(1.0), _f(2.0)], [1.0, -1.0], normalize=True)


@pytest.mark.parametrize(
    "dtype, values, expected",
    [
        # bf16 has 8 significant bits: ulp at 1 is 2^-7
        (torch.bfloat16, [1 + 2**-9, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 3 * 2**-9], [1.0, 1.0, 1 + 2**-6, 1 + 2**-7]),
        # fp16: ulp at 1 is 2^-10
        (torch.float16, [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-12], [1.0, 1 + 2**-9, 1.0]),
        (torch.float32, [1 + 2**-20], [1 + 2**-20]),
    ],
)
def test_output_rounding_nearest_even(dtype, values, expected):
    base = torch.ones(len(values))
    model = torch.tensor(values, dtype=torch.float32)
    out = weighted_sum([model], base=base, out_dtype=dtype)
    assert out.dtype == dtype
    _exact(out, torch.tensor(expected, dtype=dtype))


def test_low_precision_inputs_accumulate_in_fp32():
    a = torch.tensor([1.0], dtype=torch.bfloat16)
    b = torch.tensor([2.0**-8], dtype=torch.bfloat16)
    out = weighted_sum([a, b])
    assert out.dtype == torch.bfloat16  # default: tensors[0].dtype
    _exact(out, torch.tensor([1.0], dtype=torch.bfloat16))  # 1 + 2^-8 ties to even in bf16
    _exact(weighted_sum([a, b], out_dtype=torch.float32), _f(1.0 + 2**-8))
    # task vectors from fp16 inputs are exact fp32 differences
    base = torch.tensor([2048.0], dtype=torch.float16)
    m = torch.tensor([2050.0], dtype=torch.float16)
    _exact(weighted_sum([m], base=base, lam=0.25, out_dtype=torch.float32), _f(2048.5))


def test_shapes_empty_and_one_element():
    out = weighted_sum([torch.ones(2, 3), torch.ones(2, 3)], base=torch.zeros(2, 3))
    assert out.shape == (2, 3)
    _exact(out, torch.full((2, 3), 2.0))
    empty = weighted_sum([torch.zeros(0, 4), torch.zeros(0, 4)], normalize=True)
    assert empty.shape == (0, 4) and empty.dtype == torch.float32
    scalar = weighted_sum([torch.tensor(3.0)], base=torch.tensor(1.0), lam=2.0)
    assert scalar.shape == ()
    _exact(scalar, torch.tensor(5.0))


def test_validation():
    with pytest.raises(ValueError, match="shape"):
        weighted_sum([_f(1.0), _f(1.0, 2.0)])
    with pytest.raises(ValueError, match="shape"):
        weighted_sum([_f(1.0)], base=_f(1.0, 2.0))
    with pytest.raises(ValueError, match="weights"):
        weighted_sum([_f(1.0), _f(2.0)], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum([])
    with pytest.raises(ValueError, match="dtype"):
        weighted_sum([torch.tensor([1], dtype=torch.int32)])
    with pytest.raises(ValueError, match="out_dtype"):
        weighted_sum([_f(1.0)], out_dtype=torch.int64)
    with pytest.raises(ValueError, match="finite"):
        weighted_sum([_f(1.0)], lam=float("nan"))


def test_linear_combine_matches_the_documented_order():
    deltas = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    out = linear_combine(_f(10.0, 20.0), deltas, [2.0, 0.5], lam=2.0)
    # 10 + (2*1 + 0.5*3) * 2, 20 + (2*2 + 0.5*-4) * 2
    _exact(out, _f(17.0, 24.0))
    with pytest.raises(ValueError, match="fp32"):
        linear_combine(None, deltas.double())
