"""mergekit-style YAML files run unchanged through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pymerge.cli import main
from pymerge.io import CheckpointReader
from pymerge.ops import reference as ref

YAML = {
    "ties": """
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {m0}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {m1}
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""",
    "dare_ties": """
models:
  - model: {m0}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {m1}
    parameters:
      density: 0.53
      weight: 0.6
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
""",
}

TIES = YAML["ties"]


def _merged(out):
    t = {}
    for f in out.glob("*.safetensors"):
        t.update(load_file(f))
    return t


def _read(path):
    with CheckpointReader(path) as r:
        return {n: r.get(n).clone() for n in r.names()}


def test_mergekit_ties_yaml(family, tmp_path, capsys):
    cfg = tmp_path / "ties.yml"
    cfg.write_text(TIES.format(base=family.base, m0=family.models[0], m1=family.models[1]))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    assert "merged" in capsys.readouterr().out
    base, a, b = _read(family.base), _read(family.models[0]), _read(family.models[1])
    out = _merged(tmp_path / "out")
    for name in base:
        want = ref.ties_merge(base[name], [a[name], b[name]], [0.5, 0.3], [0.5, 0.5])
        torch.testing.assert_close(out[name], want, rtol=0, atol=0)


def test_mergekit_dare_ties_yaml(family, tmp_path):
    cfg = tmp_path / "dare.yml"
    cfg.write_text(YAML["dare_ties"].format(base=family.base, m0=family.models[0], m1=family.models[1]))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q", "--out-shard-size", "30KB"]) == 0
    assert len(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    base, a, b = _read(family.base), _read(family.models[0]), _read(family.models[1])
    out = _merged(tmp_path / "out")
    for name in base:
        want = ref.dare_merge(base[name], [a[name], b[name]], [0.4, 0.6], [0.53, 0.53], name=name, seed=0, combine="ties")
        torch.testing.assert_close(out[name], want, rtol=0, atol=0)


def test_cli_reports_errors_without_traceback(family, tmp_path, capsys):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(TIES.format(base=family.base, m0=family.models[0], m1=tmp_path / "missing"))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pymerge: error:") and "missing" in err


@pytest.mark.slow
def test_demo_runs(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for method in ("linear", "ties", "dare_ties", "slerp", "emr", "pcb"):
        assert method in out
