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


def test_console_entry_exits_with_the_status_after_writing_everything(family, tmp_path):
    # The entry point leaves with os._exit: the report, the files and the status must all be out by then.
    import subprocess
    import sys

    cfg = tmp_path / "ties.yml"
    cfg.write_text(TIES.format(base=family.base, m0=family.models[0], m1=family.models[1]))
    run = subprocess.run([sys.executable, "-m", "pymerge.cli", "merge", str(cfg), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("merged ")
    assert _merged(tmp_path / "out").keys() == _read(family.base).keys()
    main(["merge", str(cfg), str(tmp_path / "again"), "-q"])
    for f in (tmp_path / "again").iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()

    cfg.write_text(TIES.format(base=family.base, m0=family.models[0], m1=tmp_path / "missing"))
    run = subprocess.run([sys.executable, "-m", "pymerge.cli", "merge", str(cfg), str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.startswith("pymerge: error:")


@pytest.mark.slow
def test_demo_runs(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for method in ("linear", "ties", "dare_ties", "slerp", "emr", "pcb"):
        assert method in out


# Every mergekit method, written the way mergekit users write it; the expected
# tensor comes from the reference with mergekit's defaults made explicit.
MERGEKIT_YAML = {
    "linear": (
        """
models:
  - model: {m0}
    parameters:
      weight: 0.6
  - model: {m1}
    parameters:
      weight: 0.4
merge_method: linear
dtype: bfloat16
""",
        lambda n, b, x, y: ref.weighted_sum([x, y], [0.6, 0.4], normalize=True),
    ),
    "task_arithmetic": (
        """
base_model: {base}
models:
  - model: {m0}
    parameters:
      weight: 0.5
  - model: {m1}
    parameters:
      weight: 0.5
merge_method: task_arithmetic
parameters:
  lambda: 0.8
dtype: bfloat16
""",
        lambda n, b, x, y: ref.weighted_sum([x, y], [0.5, 0.5], base=b, lam=0.8),
    ),
    "dare_linear": (
        """
base_model: {base}
models:
  - model: {m0}
    parameters:
      weight: 0.5
      density: 0.6
  - model: {m1}
    parameters:
      weight: 0.5
      density: 0.6
merge_method: dare_linear
dtype: bfloat16
""",
        lambda n, b, x, y: ref.dare_merge(b, [x, y], [0.5, 0.5], [0.6, 0.6], name=n, seed=0),
    ),
    "breadcrumbs": (
        """
base_model: {base}
models:
  - model: {m0}
    parameters:
      weight: 1.0
      density: 0.9
      gamma: 0.01
  - model: {m1}
    parameters:
      weight: 1.0
      density: 0.9
      gamma: 0.01
merge_method: breadcrumbs
dtype: bfloat16
""",
        lambda n, b, x, y: ref.breadcrumbs_merge(b, [x, y], [1.0, 1.0], [0.9, 0.9], [0.01, 0.01]),
    ),
    "breadcrumbs_ties": (
        """
base_model: {base}
models:
  - model: {m0}
    parameters:
      weight: 1.0
      density: 0.9
  - model: {m1}
    parameters:
      weight: 0.7
      density: 0.8
merge_method: breadcrumbs_ties
parameters:
  gamma: 0.02
dtype: bfloat16
""",
        lambda n, b, x, y: ref.breadcrumbs_merge(b, [x, y], [1.0, 0.7], [0.9, 0.8], [0.02, 0.02], combine="ties"),
    ),
    "slerp": (
        """
base_model: {base}
models:
  - model: {base}
  - model: {m1}
merge_method: slerp
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
        None,  # checked below: t depends on the layer
    ),
}


@pytest.mark.parametrize("method", list(MERGEKIT_YAML))
def test_every_mergekit_method_yaml(family, tmp_path, method):
    text, expect = MERGEKIT_YAML[method]
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(text.format(base=family.base, m0=family.models[0], m1=family.models[1]))
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    base, a, b = _read(family.base), _read(family.models[0]), _read(family.models[1])
    out = _merged(tmp_path / "out")
    for name in base:
        if method == "slerp":
            # two layers: positions 0 and 1 of the gradient [v0 .. v4]
            layer = 0 if ".layers.0." in name else 1 if ".layers.1." in name else None
            pos = 0.0 if layer is None else float(layer)
            grads = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
            key = "self_attn" if "self_attn" in name else "mlp" if "mlp" in name else None
            t = 0.5 if key is None else (grads[key][0] if pos == 0 else grads[key][4])
            want = ref.slerp(base[name], b[name], t)
        else:
            want = expect(name, base[name], a[name], b[name])
        torch.testing.assert_close(out[name], want, rtol=0, atol=0, msg=f"{method} {name}")
