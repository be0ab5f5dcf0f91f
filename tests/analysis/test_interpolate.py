"""pymerge.analysis.interpolate: curves, barriers (specs/alignment.md) and alignment before the line."""

import pytest
import torch

from pymerge.align import barriers, mlp_spec, save_permutations
from pymerge.analysis import interpolate
from pymerge.synthetic import save_checkpoint


def _mlp(seed, widths=(6, 16, 16, 4)):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        sd[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        sd[f"layers.{i}.bias"] = 0.1 * torch.randn(b, generator=g)
    return sd


def _forward(sd, x):
    n = len(sd) // 2
    for i in range(n):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
        if i < n - 1:
            x = torch.relu(x)
    return x


def test_concave_loss_has_the_known_barrier(tmp_path):
    a, b = _mlp(0), _mlp(1)
    save_checkpoint(tmp_path / "a", a, None)
    save_checkpoint(tmp_path / "b", b, None)

    def neg_sq(sd):  # L(theta) = -||theta||^2: L(alpha) - linear = alpha (1 - alpha) ||A - B||^2
        return -sum(float(t.double().pow(2).sum()) for t in sd.values())

    res = interpolate(tmp_path / "a", tmp_path / "b", neg_sq, 21)
    dist = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a)
    assert res.alphas[0] == 0.0 and res.alphas[-1] == 1.0 and len(res.alphas) == 21
    assert res.b2 == pytest.approx(dist / 4, rel=1e-5)
    assert (res.b1, res.b2) == barriers(res.alphas, res.losses)
    assert not res.aligned and res.perms is None
    assert "B2" in res.format()


def test_convex_loss_has_no_b2():
    a, b = _mlp(0), _mlp(1)

    def sq(sd):
        return sum(float(t.double().pow(2).sum()) for t in sd.values()), 0.5

    res = interpolate(a, b, sq, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert res.b2 == 0.0
    assert res.b1 == pytest.approx(abs(res.losses[0] - res.losses[-1]) / 2, rel=1e-9)
    assert res.accuracies == [0.5] * 5 and res.midpoint_accuracy == 0.5


def _permuted(sd, seed):
    g = torch.Generator().manual_seed(seed)
    p0, p1 = torch.randperm(16, generator=g), torch.randperm(16, generator=g)
    return {
        "layers.0.weight": sd["layers.0.weight"][p0], "layers.0.bias": sd["layers.0.bias"][p0],
        "layers.1.weight": sd["layers.1.weight"][p1][:, p0], "layers.1.bias": sd["layers.1.bias"][p1],
        "layers.2.weight": sd["layers.2.weight"][:, p1], "layers.2.bias": sd["layers.2.bias"],
    }


def test_alignment_removes_the_barrier_of_a_permuted_copy(tmp_path):
    a = _mlp(0)
    b = _permuted(a, 7)  # the same function, units shuffled
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    target = _forward(a, x)

    def mse(sd):
        return float((_forward(sd, x) - target).pow(2).mean())

    assert mse(b) == pytest.approx(0.0, abs=1e-10)
    naive = interpolate(a, b, mse, 11)
    assert naive.b2 > 1e-3
    spec = mlp_spec(3)
    aligned = interpolate(a, b, mse, 11, align=True, spec=spec)
    assert aligned.aligned and aligned.perms
    assert max(aligned.losses) < 1e-10 and aligned.b2 < 1e-10
    # the same permutations from a file, or as a dict
    pf = save_permutations(tmp_path / "perm.safetensors", aligned.perms, spec=spec)
    again = interpolate(a, b, mse, 11, align=pf)
    assert again.losses == aligned.losses
    assert interpolate(a, b, mse, 11, align=aligned.perms, spec=spec).losses == aligned.losses


def test_alignment_needs_a_spec():
    a = _mlp(0)
    with pytest.raises(ValueError, match="PermutationSpec"):
        interpolate(a, _permuted(a, 1), lambda sd: 0.0, 3, align=True)
