"""Torch reference of EMR-Merging: the spec's worked example, bit packing, rescalers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pymerge.ops.reference.emr import (
    emr_elect,
    emr_merge_model,
    emr_reconstruct,
    emr_rescalers,
    pack_bits,
    unpack_bits,
)

F32 = torch.float32

TAU = [
    [0.30, -0.10, 0.05, 0, -0.40, 0.20, 0.01, -0.02, 0.50, -0.30],
    [-0.20, -0.30, 0.10, 0, 0.40, -0.10, 0.02, 0.03, 0.10, 0.20],
    [0.10, 0.20, -0.60, 0, -0.10, 0.30, 0, -0.05, 0.20, -0.10],
]
U = [0.3, -0.3, -0.6, -0.0, -0.4, 0.3, 0.02, -0.05, 0.5, -0.3]
MASKS = [
    [1, 1, 0, 0, 1, 1, 1, 1, 1, 1],
    [0, 1, 0, 0, 0, 0, 1, 0, 1, 0],
    [1, 0, 1, 0, 1, 1, 0, 1, 1, 1],
]


def _worked():
    return torch.zeros(10), [torch.tensor(t) for t in TAU]


def _signed32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def test_worked_example_u_and_masks():
    base, ts = _worked()
    r = emr_elect(base, ts)
    assert torch.equal(r.u, torch.tensor(U))
    assert torch.signbit(r.u[3])  # s == 0 elects g = -1, no model agrees: u = -0
    assert r.masks.dtype == torch.int32 and r.masks.shape == (3, 1)
    # bit j of the word = element j
    assert r.masks[:, 0].tolist() == [sum(b << j for j, b in enumerate(m)) for m in MASKS] == [1011, 322, 949]
    assert unpack_bits(r.masks, 10).to(torch.int64).tolist() == MASKS
    assert r.numel == 10


def test_worked_example_lambdas():
    base, ts = _worked()
    r = emr_elect(base, ts)
    # sums by hand: sum |tau_i| and sum over M_i of |u|
    s_tau = [1.88, 1.45, 1.65]
    s_u = [2.17, 0.82, 2.45]
    torch.testing.assert_close(r.abs_tau_sum, torch.tensor(s_tau, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.abs_masked_u_sum, torch.tensor(s_u, dtype=torch.float64), rtol=0, atol=1e-6)
    for scope in ("tensor_mean_sum", "model"):
        lam = emr_rescalers([r.abs_tau_sum], [r.abs_masked_u_sum], [10], scope=scope)
        assert lam == pytest.approx([0.86636, 1.76829, 0.67347], abs=5e-6)
        assert lam == pytest.approx([a / b for a, b in zip(s_tau, s_u)], rel=1e-6)


def test_worked_example_split_into_two_tensors():
    base = {"a": torch.zeros(4), "b": torch.zeros(6)}
    models = [{"a": torch.tensor(t[:4]), "b": torch.tensor(t[4:])} for t in TAU]
    u, masks, lam = emr_merge_model(base, models)
    assert torch.equal(torch.cat([u["a"], u["b"]]), torch.tensor(U))
    assert unpack_bits(masks["a"], 4).to(torch.int64).tolist() == [m[:4] for m in MASKS]
    assert unpack_bits(masks["b"], 6).to(torch.int64).tolist() == [m[4:] for m in MASKS]
    # per tensor (numel 4 | numel 6): sum |tau_i| and sum |M_i u|, by hand
    tau_a, tau_b = [0.45, 0.6, 0.9], [1.43, 0.85, 0.75]
    u_a, u_b = [0.6, 0.3, 0.9], [1.57, 0.52, 1.55]
    mean_sum = [(tau_a[i] / 4 + tau_b[i] / 6) / (u_a[i] / 4 + u_b[i] / 6) for i in range(3)]
    assert lam == pytest.approx(mean_sum, rel=1e-6)
    assert lam != pytest.approx([0.86636, 1.76829, 0.67347], abs=1e-3)
    _, _, lam_model = emr_merge_model(base, models, rescale_scope="model")
    assert lam_model == pytest.approx([0.86636, 1.76829, 0.67347], abs=5e-6)


def test_zero_sign_modes():
    base = torch.tensor([1.0, 1.0, 1.0])
    ts = [torch.tensor([1.5, 1.0, 2.0]), torch.tensor([0.5, 1.0, 0.0])]  # tau: [.5,0,1], [-.5,0,-1]
    neg = emr_elect(base, ts, zero_sign="neg")
    # s == 0 everywhere; "neg" elects -1: model 1 agrees where tau_1 < 0
    assert neg.u.tolist() == [-0.5, -0.0, -1.0]
    assert unpack_bits(neg.masks, 3).tolist() == [[False, False, False], [True, False, True]]
    zero = emr_elect(base, ts, zero_sign="zero")
    assert zero.u.tolist() == [0.0, 0.0, 0.0] and not torch.signbit(zero.u).any()
    assert zero.masks.tolist() == [[0], [0]]
    assert zero.abs_masked_u_sum.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        emr_elect(base, ts, zero_sign="pos")


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100])
def test_pack_unpack_round_trip(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(3, n, generator=g) < 0.5
    words = pack_bits(mask)
    assert words.dtype == torch.int32 and words.shape == (3, (n + 31) // 32)
    assert torch.equal(unpack_bits(words, n), mask)
    for row, m in zip(words.tolist(), mask.tolist()):
        for w, word in enumerate(row):
            assert word == _signed32(sum(1 << j for j in range(32) if 32 * w + j < n and m[32 * w + j]))


def test_pack_hand_patterns():
    m = torch.zeros(33, dtype=torch.bool)
    m[31] = m[32] = True
    assert pack_bits(m).tolist() == [-(2**31), 1]  # bit 31 set reads negative
    assert pack_bits(torch.ones(33, dtype=torch.bool)).tolist() == [-1, 1]  # padding stays zero
    m = torch.zeros(100, dtype=torch.bool)
    m[99] = m[0] = m[2] = True
    assert pack_bits(m).tolist() == [5, 0, 0, 8]
    assert pack_bits(torch.zeros(0, dtype=torch.bool)).shape == (0,)
    assert unpack_bits(torch.tensor([-(2**31)], dtype=torch.int32), 32).nonzero().flatten().tolist() == [31]


def test_pack_errors():
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.int32), 70)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.int64), 40)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=200))
def test_pack_round_trip_property(bits):
    mask = torch.tensor(bits, dtype=torch.bool)
    words = pack_bits(mask)
    assert words.shape == ((len(bits) + 31) // 32,)
    expected = [_signed32(sum(1 << j for j, b in enumerate(bits[32 * w:32 * w + 32]) if b))
                for w in range((len(bits) + 31) // 32)]
    assert words.tolist() == expected
    assert unpack_bits(words, len(bits)).tolist() == bits


def test_rescalers_scopes_and_guards():
    # tensor A (numel 2): S_tau 1, S_u 2; tensor B (numel 4): S_tau 4, S_u 4; empty tensor skipped
    s_tau = [[1.0], [0.0], [4.0]]
    s_u = [[2.0], [0.0], [4.0]]
    numels = [2, 0, 4]
    assert emr_rescalers(s_tau, s_u, numels) == [pytest.approx((0.5 + 1.0) / (1.0 + 1.0))]
    assert emr_rescalers(s_tau, s_u, numels, scope="model") == [pytest.approx(5 / 6)]
    # a model that agrees nowhere has a zero denominator: lambda = 1
    assert emr_rescalers([[3.0, 1.0]], [[0.0, 2.0]], [4]) == [1.0, 0.5]
    assert emr_rescalers([], [], []) == []
    with pytest.raises(ValueError):
        emr_rescalers(s_tau, s_u, numels, scope="tensor")
    with pytest.raises(ValueError):
        emr_rescalers(s_tau, s_u, [2, 4])


def test_reconstruct_hand():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    u = torch.tensor([0.5, -1.0, 2.0, 8.0])
    words = pack_bits(torch.tensor([True, False, True, False]))
    assert emr_reconstruct(base, u, words, 2.0).tolist() == [2.0, 2.0, 7.0, 4.0]


def test_reconstruct_no_fused_multiply_add():
    # lam*u = 1 + 2^-11 + 2^-24 rounds (tie, to even) to 1 + 2^-11 before the add: exactly 0
    x = 1 + 2**-12
    out = emr_reconstruct(torch.tensor([-(1 + 2**-11)]), torch.tensor([x]), pack_bits(torch.tensor([True])), x)
    assert out.item() == 0.0


def test_reconstruct_random_matches_formula():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 37, generator=g)
    u = torch.randn(5, 37, generator=g)
    mask = torch.rand(5, 37, generator=g) < 0.4
    out = emr_reconstruct(base, u, pack_bits(mask.reshape(-1)), 0.7)
    expected = base.double() + 0.7 * mask.double() * u.double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(out[~mask], base[~mask])


def test_reconstruct_rounds_once_to_bf16():
    base = torch.tensor([1.0], dtype=torch.bfloat16)
    u = torch.tensor([2**-8])
    words = pack_bits(torch.tensor([True]))
    out = emr_reconstruct(base, u, words, 1.0)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0  # 1 + 2^-8: tie to even
    assert emr_reconstruct(base, u, words, 1.5).item() == 1.0 + 2**-7  # 1.005859375
    assert emr_reconstruct(base, u, words, 1.0, out_dtype=F32).item() == 1.0 + 2**-8


def test_reconstruct_errors():
    base = torch.zeros(40)
    with pytest.raises(ValueError):
        emr_reconstruct(base, torch.zeros(40), torch.zeros(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError):
        emr_reconstruct(base, torch.zeros(39), torch.zeros(2, dtype=torch.int32), 1.0)


def test_one_model_reconstructs_itself():
    g = torch.Generator().manual_seed(2)
    base = torch.randint(-50, 50, (6, 9), generator=g).to(torch.bfloat16)
    model = torch.randint(-50, 50, (6, 9), generator=g).to(torch.bfloat16)
    base_d, models = {"w": base}, [{"w": model}]
    u, masks, lam = emr_merge_model(base_d, models)
    # one model: u = tau, mask = [tau != 0], lambda = 1
    assert lam == [1.0]
    assert torch.equal(u["w"], model - base)
    assert torch.equal(unpack_bits(masks["w"], 54).reshape(6, 9)[0], (model != base)[0])
    assert torch.equal(emr_reconstruct(base, u["w"], masks["w"][0], lam[0]), model)


def test_dtypes():
    base = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    ts = [torch.tensor([0.5, 0.0], dtype=torch.float16), torch.tensor([0.25, 3.0], dtype=F32)]
    r = emr_elect(base, ts)
    assert r.u.dtype == torch.bfloat16 and r.u.tolist() == [0.5, 2.0]
    r32 = emr_elect(base, ts, out_dtype=F32)
    assert r32.u.dtype == F32
    # the rescaler sums use fp32 u even when u is stored rounded
    x = emr_elect(torch.zeros(1, dtype=torch.bfloat16), [torch.tensor([1 + 2**-10])])
    assert x.u.item() == 1.0 and x.abs_masked_u_sum.item() == 1 + 2**-10


def test_empty_and_one_element():
    r = emr_elect(torch.zeros(0, 3), [torch.zeros(0, 3), torch.zeros(0, 3)])
    assert r.u.shape == (0, 3) and r.masks.shape == (2, 0) and r.numel == 0
    assert r.abs_tau_sum.tolist() == [0.0, 0.0]
    r = emr_elect(torch.tensor(1.0), [torch.tensor(3.0), torch.tensor(0.0)])
    assert r.u.shape == () and r.u.item() == 2.0 and r.masks.tolist() == [[1], [0]]


def test_merge_model_selects_tensors():
    base = {
        "w": torch.zeros(2, 2),
        "ids": torch.zeros(3, dtype=torch.int64),
        "head": torch.zeros(4),
        "empty": torch.zeros(0),
    }
    m1 = {"w": torch.ones(2, 2), "ids": torch.ones(3, dtype=torch.int64), "head": torch.ones(5),
          "empty": torch.zeros(0)}
    m2 = {"w": -torch.ones(2, 2) * 3, "ids": torch.ones(3, dtype=torch.int64), "head": torch.ones(4),
          "empty": torch.zeros(0)}
    u, masks, lam = emr_merge_model(base, [m1, m2])
    assert list(u) == ["w", "empty"] == list(masks)
    assert u["w"].tolist() == [[-3.0, -3.0], [-3.0, -3.0]]
    # model 1 agrees nowhere (lambda = 1); model 2: mean|tau| 3 / mean|u| 3
    assert lam == [1.0, 1.0]
    with pytest.raises(ValueError):
        emr_merge_model(base, [m1, {"w": torch.ones(2, 2)}])
