"""Layer slices (passthrough): a model stacked from layer ranges of others, streamed like any merge."""

import json

import pytest
import torch

import pymerge
import pymerge.config
from pymerge.errors import ConfigError, InputMismatchError
from pymerge.io import CheckpointReader
from pymerge.synthetic import llama_family


def _slices(*ranges):
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(m), "layer_range": [a, b]}]} for m, a, b in ranges]}


def _all(path):
    with CheckpointReader(path) as r:
        return {n: r.get(n).clone() for n in r.names()}


def test_slices_stack_layers_of_several_models(family, tmp_path):
    a, b = family.models[0], family.models[1]
    cfg = _slices((a, 0, 2), (b, 1, 2), (a, 0, 1))
    report = pymerge.merge(cfg, tmp_path / "out", out_shard_size=4000)
    out, ta, tb = _all(tmp_path / "out"), _all(a), _all(b)
    # output layer k <- (model, layer): 0 <- a0, 1 <- a1, 2 <- b1, 3 <- a0
    source = {0: (ta, 0), 1: (ta, 1), 2: (tb, 1), 3: (ta, 0)}
    for name, t in out.items():
        parts = name.split(".")
        if "layers" in parts:
            k = int(parts[parts.index("layers") + 1])
            src, layer = source[k]
            parts[parts.index("layers") + 1] = str(layer)
            want = src[".".join(parts)]
        else:
            want = ta[name]
        assert torch.equal(t, want), name
    assert sum("layers.3." in n for n in out) == sum("layers.0." in n for n in ta)
    assert not any("layers.4." in n for n in out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert report.tensors == len(out)


def test_sliced_model_loads_and_runs_in_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = _slices((family.models[0], 0, 1), (family.models[2], 0, 2))
    pymerge.merge(cfg, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_passthrough_of_one_model_is_a_copy(family, tmp_path):
    pymerge.merge({"merge_method": "passthrough", "models": [{"model": str(family.models[1])}], "dtype": "float32"},
                  tmp_path / "out")
    out, src = _all(tmp_path / "out"), _all(family.models[1])
    assert out.keys() == src.keys()
    for n in src:
        assert out[n].dtype == torch.float32 and torch.equal(out[n], src[n].float()), n


def test_slices_of_other_widths_are_refused(family, tmp_path):
    wide = llama_family(tmp_path / "wide", n_models=0, layers=2, hidden=32, intermediate=60, heads=4, kv_heads=2,
                        vocab=50, dtype=torch.bfloat16, shards=1, seed=3).base
    with pytest.raises(InputMismatchError, match="layer 1 .*shape"):
        pymerge.merge(_slices((family.models[0], 0, 1), (wide, 1, 2)), tmp_path / "out")
    with pytest.raises(InputMismatchError, match=r"layer_range \[1, 3\] is outside the 2 layers"):
        pymerge.merge(_slices((family.models[0], 1, 3)), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize("bad, match", [
    ({"merge_method": "linear", "slices": []}, "passthrough, not linear"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]},
                                                             {"model": "b", "layer_range": [0, 1]}]}]},
     "exactly one source per slice"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]}, "start < end"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "parameters": {}}]}]},
     "parameters"),
    ({"merge_method": "passthrough", "models": ["a", "b"]}, "copies one model or stacks layer slices"),
    ({"merge_method": "linear", "models": [{"model": "a", "layer_range": [0, 1]}]}, "go under slices"),
])
def test_slice_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        pymerge.config.load_config(bad)
