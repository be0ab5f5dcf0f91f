"""`pymerge align` then a merge whose config names the permutation file."""

import pytest
import torch
from safetensors.torch import load_file

from pymerge.align import llama_spec, permute_state_dict
from pymerge.cli import main
from pymerge.io import CheckpointReader
from pymerge.synthetic import llama_family, save_checkpoint


def test_align_then_merge_recovers_a_permuted_copy(tmp_path):
    fam = llama_family(tmp_path / "fam", n_models=1, layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=40,
                       dtype=torch.float32, shards=2, seed=5)
    with CheckpointReader(fam.base) as r:
        base = {n: r.get(n) for n in r.names()}
        config = r.config()
    spec = llama_spec(2, 32, 4, 2, 48)
    perms = spec.random(spec.infer_sizes({n: t.shape for n, t in base.items()}), generator=torch.Generator().manual_seed(0))
    shuffled = permute_state_dict(base, spec, perms)
    assert any(not torch.equal(shuffled[n], base[n]) for n in base)
    save_checkpoint(tmp_path / "shuffled", shuffled, config)

    assert main(["align", str(fam.base), str(tmp_path / "shuffled"), str(tmp_path / "p.safetensors"), "--arch", "llama"]) == 0
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"""
merge_method: linear
models:
  - model: {fam.base}
  - model: {tmp_path / "shuffled"}
    permutations: {tmp_path / "p.safetensors"}
""")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(f))
    for n in base:  # the average of a model and its aligned permuted copy is the model
        torch.testing.assert_close(out[n], base[n], rtol=0, atol=0, msg=n)


def test_bad_permutation_file_is_a_clear_error(family, tmp_path, capsys):
    (tmp_path / "p.safetensors").write_bytes(b"nonsense")
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"""
merge_method: linear
models:
  - model: {family.base}
  - model: {family.models[0]}
    permutations: {tmp_path / "p.safetensors"}
""")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    assert "permutations" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [3, ""])
def test_permutations_key_is_validated(family, bad):
    from pymerge.config import load_config
    from pymerge.errors import ConfigError

    with pytest.raises(ConfigError, match="permutations"):
        load_config({"merge_method": "linear", "models": [{"model": str(family.base), "permutations": bad}]})


def _family(root, intermediate, seed, kv_heads=2):
    return llama_family(root, n_models=0, layers=2, hidden=32, intermediate=intermediate, heads=2 * kv_heads,
                        kv_heads=kv_heads, vocab=40, dtype=torch.float32, shards=2, seed=seed).base


def _load(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("donor_width", [64, 40])  # wider: units selected; narrower: uncovered units
@pytest.mark.parametrize("normalize,uncovered", [(True, "keep"), (False, "shrink")])
def test_models_of_other_widths_merge_through_partial_maps(tmp_path, donor_width, normalize, uncovered):
    from pymerge.align import load_permutation_file, merge_widths

    base, donor = _family(tmp_path / "a", 48, 1), _family(tmp_path / "b", donor_width, 2)
    assert main(["align", str(base), str(donor), str(tmp_path / "p.safetensors"), "--arch", "llama"]) == 0
    pf = load_permutation_file(tmp_path / "p.safetensors")
    assert pf.perms["layers.0.mlp"].shape == (48,)
    assert bool((pf.perms["layers.0.mlp"] < 0).any()) == (donor_width < 48)
    cfg = {"merge_method": "linear", "parameters": {"normalize": normalize},
           "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                      {"model": str(donor), "permutations": str(tmp_path / "p.safetensors"), "parameters": {"weight": 0.5}}]}
    import pymerge

    pymerge.merge(cfg, tmp_path / "out")
    got = _load(tmp_path / "out")
    with CheckpointReader(base) as rb, CheckpointReader(donor) as rd:
        want = merge_widths(rb, rd, pf.perms, 0.5, spec=pf.spec, uncovered=uncovered)
        assert got["model.layers.0.mlp.down_proj.weight"].shape == rb.shape("model.layers.0.mlp.down_proj.weight")
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)


def test_other_widths_need_the_linear_method(tmp_path):
    import pymerge
    from pymerge.errors import MergeError

    base, donor = _family(tmp_path / "a", 48, 1), _family(tmp_path / "b", 40, 2)
    assert main(["align", str(base), str(donor), str(tmp_path / "p.safetensors"), "--arch", "llama"]) == 0
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(base)}, {"model": str(donor), "permutations": str(tmp_path / "p.safetensors")}]}
    with pytest.raises(MergeError, match="linear only"):
        pymerge.merge(cfg, tmp_path / "out")


def test_linear_with_permutations_is_one_fused_permute_average(tmp_path, monkeypatch):
    import pymerge
    from pymerge import ops
    from pymerge.align import merge_with_permutations

    base, other = _family(tmp_path / "a", 48, 1), _family(tmp_path / "b", 48, 2)
    assert main(["align", str(base), str(other), str(tmp_path / "p.safetensors"), "--arch", "llama"]) == 0
    calls = []
    real = ops.permute_average
    monkeypatch.setattr(ops, "permute_average", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(base), "parameters": {"weight": 0.3}},
                      {"model": str(other), "permutations": str(tmp_path / "p.safetensors"), "parameters": {"weight": 0.7}}]}
    pymerge.merge(cfg, tmp_path / "out")
    assert calls, "the engine re-indexed tensors instead of fusing the permutation into the average"
    merge_with_permutations(base, [other], [tmp_path / "p.safetensors"], tmp_path / "ref", coeffs=[0.3, 0.7])
    got, want = _load(tmp_path / "out"), _load(tmp_path / "ref")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)
