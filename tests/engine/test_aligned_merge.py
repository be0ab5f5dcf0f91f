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
