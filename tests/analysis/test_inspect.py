"""`inspect` on a family with planted structure reports exactly that structure."""

import json

import numpy as np
import pytest
import torch

from pymerge.analysis import inspect_models
from pymerge.analysis.inspect_models import main_inspect
from pymerge.io import CheckpointReader
from pymerge.synthetic import save_checkpoint

# every value is a small multiple of a power of two, so theta_0 + tau and the difference back are exact in fp32
SHAPES = {
    "model.embed_tokens.weight": (12, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.mlp.up_proj.bias": (16,),
    "model.layers.1.mlp.up_proj.weight": (16, 8),
    "model.layers.1.mlp.up_proj.bias": (16,),
}


def _grid(shape, g, scale, nonzero=True):
    v = torch.randint(1, 64, shape, generator=g).float() * scale
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return v * sign if nonzero else v * sign * (torch.rand(shape, generator=g) >= 0.25)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Models A, B = A, C = -A (opposite), D independent (25% exact zeros) except in layer 1, where D = A."""
    root = tmp_path_factory.mktemp("planted")
    g = torch.Generator().manual_seed(3)
    base = {n: _grid(s, g, 2.0**-4) for n, s in SHAPES.items()}
    a = {n: _grid(s, g, 2.0**-10) for n, s in SHAPES.items()}
    d = {n: (a[n].clone() if ".layers.1." in n else _grid(s, g, 2.0**-10, nonzero=False)) for n, s in SHAPES.items()}
    taus = [a, {n: t.clone() for n, t in a.items()}, {n: -t for n, t in a.items()}, d]
    extra_base = {"lm_head.weight": torch.ones(3, 8), "position_ids": torch.arange(8)}
    paths = []
    for i, tau in enumerate(taus):
        tensors = {n: base[n] + tau[n] for n in SHAPES}
        tensors["lm_head.weight"] = torch.ones(3 + i, 8)  # a task head: shapes differ
        tensors["position_ids"] = torch.arange(8)
        paths.append(save_checkpoint(root / f"m{i}", tensors, None, shards=2))
    base_dir = save_checkpoint(root / "base", {**base, **extra_base}, None, shards=2)
    return base_dir, paths, base, taus


def _flat(tensors, names):
    return np.concatenate([tensors[n].double().numpy().ravel() for n in names])


def _expected(base, taus, names):
    t = np.stack([_flat(tau, names) for tau in taus])
    b = _flat(base, names)
    return t, b


def test_planted_structure_overall(planted):
    base_dir, paths, base, taus = planted
    rep = inspect_models(paths, base_dir, densities=(0.1, 0.5))
    o = rep.overall
    names = list(SHAPES)
    t, b = _expected(base, taus, names)

    assert sorted(o.tensors) == sorted(names)
    assert o.numel == t.shape[1]
    assert dict(rep.skipped) == {"lm_head.weight": "shapes differ", "position_ids": "not floating point"}
    # norms: A, B and C are the same size
    np.testing.assert_allclose(o.norms, np.linalg.norm(t, axis=1), rtol=1e-12)
    assert o.norms[0] == o.norms[1] == o.norms[2]
    np.testing.assert_allclose(o.relative_norms, np.linalg.norm(t, axis=1) / np.linalg.norm(b), rtol=1e-12)
    # cosine: identical pair +1, opposite pairs -1
    c = o.cosine
    assert c[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert c[0, 2] == pytest.approx(-1.0, abs=1e-12)
    assert c[1, 2] == pytest.approx(-1.0, abs=1e-12)
    ref = (t @ t.T) / np.outer(np.linalg.norm(t, axis=1), np.linalg.norm(t, axis=1))
    np.testing.assert_allclose(c, ref, atol=1e-12)
    # sign conflicts: none between the identical pair, all between the opposite ones
    pc = o.pairwise_conflict
    assert pc[0, 1] == 0.0
    assert pc[0, 2] == 1.0 and pc[1, 2] == 1.0
    both = (t[0] != 0) & (t[3] != 0)
    assert pc[0, 3] == pytest.approx(np.mean(np.sign(t[0][both]) != np.sign(t[3][both])), abs=0)
    assert pc[2, 3] == pytest.approx(1.0 - pc[0, 3], abs=1e-15)
    # A is dense and C = -A: every parameter has a conflict
    assert o.conflict_fraction == 1.0
    # zeros: only D has them (planted in layer 0 and the embeddings)
    assert o.zero_fraction[:3].tolist() == [0.0, 0.0, 0.0]
    assert o.zero_fraction[3] == pytest.approx(np.mean(t[3] == 0), abs=0)
    assert 0.1 < o.zero_fraction[3] < 0.3


def test_planted_structure_kept_energy_and_trimmed_conflicts(planted):
    base_dir, paths, base, taus = planted
    densities = (0.1, 0.5)
    rep = inspect_models(paths, base_dir, densities=densities)
    o = rep.overall
    names = list(SHAPES)
    for k, dens in enumerate(densities):
        kept = np.zeros(4)
        trimmed = []
        for n in names:
            tt = np.stack([tau[n].double().numpy().ravel() for tau in taus])
            cnt = max(1, int(dens * tt.shape[1]))
            row = []
            for i in range(4):
                order = np.argsort(-np.abs(tt[i]), kind="stable")
                kept[i] += np.sum(tt[i][order[:cnt]] ** 2)
                m = np.zeros(tt.shape[1], bool)
                m[order[:cnt]] = True
                row.append(np.where(m, tt[i], 0))
            trimmed.append(np.stack(row))
        total = np.array([sum(float((tau[n].double() ** 2).sum()) for n in names) for tau in taus])
        np.testing.assert_allclose(o.kept_energy[k], kept / total, rtol=1e-12)
        tr = np.concatenate(trimmed, axis=1)
        expected = np.mean((tr > 0).any(0) & (tr < 0).any(0))
        assert o.trimmed_conflict_fraction[k] == pytest.approx(expected, abs=0)
    # A, B and C keep the same share (same magnitudes); more density keeps more
    assert o.kept_energy[0, 0] == o.kept_energy[0, 1] == o.kept_energy[0, 2]
    assert np.all(o.kept_energy[1] > o.kept_energy[0])


def test_planted_structure_emr():
    """A, B = A, C = -A: EMR elects A's signs; A and B keep every entry, C none; all rescalers 1."""
    g = torch.Generator().manual_seed(5)
    base = {n: _grid(s, g, 2.0**-4) for n, s in SHAPES.items()}
    a = {n: _grid(s, g, 2.0**-10) for n, s in SHAPES.items()}
    models = [{n: base[n] + a[n] for n in SHAPES}, {n: base[n] + a[n] for n in SHAPES}, {n: base[n] - a[n] for n in SHAPES}]
    rep = inspect_models(models, base, densities=())
    assert rep.overall.emr_mask_density.tolist() == [1.0, 1.0, 0.0]
    assert rep.overall.emr_rescalers == [1.0, 1.0, 1.0]
    for grp in rep.groups:
        assert grp.emr_mask_density.tolist() == [1.0, 1.0, 0.0]
    assert rep.overall.cosine.round(12).tolist() == [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]


def test_emr_numbers_match_a_direct_computation(planted):
    base_dir, paths, base, taus = planted
    rep = inspect_models(paths, base_dir, densities=())
    names = list(SHAPES)
    num = np.zeros(4)
    den = np.zeros(4)
    count = np.zeros(4)
    for n in names:
        tt = np.stack([tau[n].double().numpy().ravel() for tau in taus])
        s = tt.sum(0)
        gsign = np.where(s > 0, 1.0, -1.0)
        agree = gsign * tt > 0
        u = gsign * np.where(agree, np.abs(tt), 0).max(0)
        count += agree.sum(1)
        num += np.abs(tt).sum(1) / tt.shape[1]
        den += (agree * np.abs(u)).sum(1) / tt.shape[1]
    np.testing.assert_array_equal(rep.overall.emr_mask_density, count / rep.overall.numel)
    np.testing.assert_allclose(rep.overall.emr_rescalers, num / den, rtol=1e-12)
    # the engine writes the same rescalers into an EMR folder
    import pymerge

    out = base_dir.parent / "emr-out"
    cfg = {"merge_method": "emr", "base_model": str(base_dir), "models": [{"model": str(p)} for p in paths]}
    pymerge.merge(cfg, out, overwrite=True)
    with pymerge.emr.load(out) as e:
        np.testing.assert_allclose(e.lambdas, rep.overall.emr_rescalers, rtol=1e-12)


def test_per_layer_structure(planted):
    base_dir, paths, _, _ = planted
    rep = inspect_models(paths, base_dir)
    assert [g.name for g in rep.groups] == ["model.embed_tokens.weight", "layer 0", "layer 1"]
    l0, l1 = rep.group("layer 0"), rep.group("layer 1")
    assert sorted(l0.tensors) == ["model.layers.0.mlp.up_proj.bias", "model.layers.0.mlp.up_proj.weight"]
    # D equals A in layer 1 only
    assert l1.cosine[0, 3] == pytest.approx(1.0, abs=1e-12)
    assert l1.pairwise_conflict[0, 3] == 0.0
    assert abs(l0.cosine[0, 3]) < 0.5
    # the groups add up to the overall numbers
    assert sum(g.numel for g in rep.groups) == rep.overall.numel
    np.testing.assert_allclose(sum(g.gram for g in rep.groups), rep.overall.gram, rtol=1e-12)
    by_tensor = inspect_models(paths, base_dir, group="tensor")
    assert len(by_tensor.groups) == len(SHAPES)


def test_streams_one_tensor_name_at_a_time(planted, monkeypatch):
    base_dir, paths, _, _ = planted
    reads = []
    orig = CheckpointReader.get

    def spy(self, name):
        reads.append(name)
        return orig(self, name)

    monkeypatch.setattr(CheckpointReader, "get", spy)
    inspect_models(paths, base_dir)
    n = len(paths) + 1
    assert len(reads) == n * len(SHAPES)
    # the base and every model's tensor of one name, then the next name: never two names in flight
    for k in range(0, len(reads), n):
        assert len(set(reads[k:k + n])) == 1
    assert len(set(reads[::n])) == len(SHAPES)


def test_chunking_does_not_change_the_numbers(planted):
    base_dir, paths, _, _ = planted
    a = inspect_models(paths, base_dir).to_dict()
    b = inspect_models(paths, base_dir, chunk_elements=7).to_dict()
    np.testing.assert_allclose(np.array(a["overall"]["cosine"]), np.array(b["overall"]["cosine"]), atol=1e-12)
    assert a["overall"]["pairwise_sign_conflict"] == b["overall"]["pairwise_sign_conflict"]
    assert a["overall"]["sign_conflict_fraction"] == b["overall"]["sign_conflict_fraction"]


def test_bf16_inputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.weight": torch.randn(32, 16, generator=g).bfloat16()}
    m = [{"layers.0.weight": (base["layers.0.weight"].float() + 0.01 * torch.randn(32, 16, generator=g)).bfloat16()}
         for _ in range(2)]
    rep = inspect_models(m, base)
    tau = torch.stack([x["layers.0.weight"].float() - base["layers.0.weight"].float() for x in m]).reshape(2, -1).double()
    np.testing.assert_allclose(rep.overall.norms, tau.norm(dim=1).numpy(), rtol=1e-12)


def test_cli_text_plot_and_json(planted, tmp_path, capsys):
    base_dir, paths, _, _ = planted
    png = tmp_path / "inspect.png"
    js = tmp_path / "inspect.json"
    assert main_inspect([*map(str, paths), "--base", str(base_dir), "--density", "0.2", "--plot", str(png),
                         "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "pairwise cosine similarity" in out
    assert "+1.0000" in out and "-1.0000" in out
    assert "layer 0" in out and "layer 1" in out
    assert "EMR mask" in out
    assert "parameters with a sign conflict between tasks: 100.0%" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["overall"]["pairwise_sign_conflict"][0][2] == 1.0
    assert [g["name"] for g in data["groups"]] == ["model.embed_tokens.weight", "layer 0", "layer 1"]


def test_selection_and_popcount_helpers():
    from pymerge.analysis.inspect_models import _popcount, _top_k
    from pymerge.ops.reference.emr import pack_bits
    from pymerge.ops.reference.ties import topk_keep_mask

    g = torch.Generator().manual_seed(0)
    tau = torch.randint(-3, 4, (1000,), generator=g).float() * 0.5  # many ties, zeros of both signs
    tau[::7] = -0.0
    for k in (0, 1, 5, 137, 500, 999, 1000, 1200):
        keep, sq = _top_k(tau, k)
        assert torch.equal(keep, topk_keep_mask(tau.abs(), k))
        assert sq == pytest.approx(float((tau[keep].double() ** 2).sum()), abs=0)
    bits = torch.rand(3, 1001, generator=g) < torch.tensor([[0.1], [0.5], [0.9]])
    assert _popcount(pack_bits(bits)).tolist() == bits.sum(dim=1).tolist()


def test_errors(planted):
    base_dir, paths, _, _ = planted
    with pytest.raises(ValueError):
        inspect_models([], base_dir)
    with pytest.raises(ValueError):
        inspect_models(paths, base_dir, group="block")
    with pytest.raises(ValueError):
        inspect_models(paths, base_dir, densities=(1.5,))
    base = {"w": torch.zeros(4)}
    with pytest.raises(ValueError, match="NaN"):
        inspect_models([{"w": torch.tensor([0.0, float("nan"), 1.0, 2.0])}], base)
