"""Interpolation paths and BatchNorm re-estimation."""

import pytest
import torch

from pymerge.align import interpolate, interpolation_curve, recompute_batchnorm


def test_interpolate_endpoints_and_dtypes():
    a = {"w": torch.tensor([0.0, 2.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([4.0, 6.0], dtype=torch.bfloat16), "n": torch.tensor([5])}
    mid = interpolate(a, b, 0.5)
    assert mid["w"].dtype == torch.bfloat16 and mid["w"].tolist() == [2.0, 4.0]
    assert mid["n"].tolist() == [3]  # integer tensors come from A
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    with pytest.raises(ValueError, match="differ"):
        interpolate(a, {"w": b["w"]}, 0.5)


def test_interpolation_curve_accepts_loss_tuple_or_dict():
    a, b = {"w": torch.tensor(0.0)}, {"w": torch.tensor(2.0)}
    # loss 2 - (w - 1)^2: a bump of height 1 in the middle of the path
    curve = interpolation_curve(a, b, lambda sd: {"loss": 2 - (float(sd["w"]) - 1) ** 2, "accuracy": 1.0, "n": 3}, 5)
    assert curve.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.midpoint_loss == pytest.approx(2.0)
    assert curve.b1 == pytest.approx(1.0) and curve.b2 == pytest.approx(1.0)
    assert curve.accuracies == [1.0] * 5 and curve.extras[0] == {"n": 3}
    plain = interpolation_curve(a, b, lambda sd: float(sd["w"]), [0.0, 1.0])
    assert plain.accuracies is None and plain.b2 == 0.0


def test_recompute_batchnorm_matches_the_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).eval()
    batches = [torch.randn(50, 3) * 2 + 1 for _ in range(4)]
    recompute_batchnorm(model, batches)
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        h = model[0](torch.cat(batches))
    torch.testing.assert_close(model[1].running_mean, h.mean(0), atol=1e-5, rtol=1e-5)
