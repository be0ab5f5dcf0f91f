"""End to end: every method through the streaming engine, checked tensor by tensor against the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file

import pymerge
import pymerge.cli
from pymerge.io import CheckpointReader
from pymerge.ops import reference as ref


def _load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _inputs(family):
    with CheckpointReader(family.base) as b:
        base = {n: b.get(n).clone() for n in b.names()}
    models = []
    for m in family.models:
        with CheckpointReader(m) as r:
            models.append({n: r.get(n).clone() for n in r.names()})
    return base, models


def _config(family, method, per_model=None, params=None, models=None, **top):
    models = family.models if models is None else models
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(m), "parameters": dict(per_model or {})} for m in models],
        "parameters": dict(params or {}),
        **top,
    }


W = [1.0, 0.5, -0.3]
D = [0.3, 0.5, 0.7]

# method -> (per-model params (list index i), top-level params, reference for one tensor)
PER_TENSOR = {
    "linear": (
        lambda i: {"weight": W[i] + 1},
        {},
        lambda name, b, ts: ref.weighted_sum(ts, [w + 1 for w in W], normalize=True),
    ),
    "task_arithmetic": (
        lambda i: {"weight": W[i]},
        {"lambda": 0.7},
        lambda name, b, ts: ref.weighted_sum(ts, W, base=b, lam=0.7),
    ),
    "ties": (
        lambda i: {"weight": W[i], "density": D[i]},
        {"lambda": 0.9},
        lambda name, b, ts: ref.ties_merge(b, ts, W, D, lam=0.9),
    ),
    "dare_linear": (
        lambda i: {"weight": W[i], "density": D[i]},
        {},
        lambda name, b, ts: ref.dare_merge(b, ts, W, D, name=name, seed=7),
    ),
    "dare_ties": (
        lambda i: {"weight": W[i], "density": D[i]},
        {"rescale": "inverse_density"},
        lambda name, b, ts: ref.dare_merge(b, ts, W, D, name=name, seed=7, rescale="inverse_density", combine="ties"),
    ),
    "breadcrumbs": (
        lambda i: {"weight": W[i], "density": D[i], "gamma": 0.05},
        {},
        lambda name, b, ts: ref.breadcrumbs_merge(b, ts, W, D, 0.05),
    ),
    "breadcrumbs_ties": (
        lambda i: {"weight": W[i], "density": D[i]},
        {"consensus": "count"},
        lambda name, b, ts: ref.breadcrumbs_merge(b, ts, W, D, 0.01, combine="ties", consensus="count"),
    ),
    "pcb": (
        lambda i: {},
        {"scope": "tensor", "density": 0.3},
        lambda name, b, ts: ref.pcb_merge(b, ts, density=0.3),
    ),
}


@pytest.mark.parametrize("method", list(PER_TENSOR))
def test_method_matches_reference(family, tmp_path, method):
    per_model, params, expect = PER_TENSOR[method]
    cfg = _config(family, method, params=params, seed=7)
    for i, m in enumerate(cfg["models"]):
        m["parameters"] = per_model(i)
    report = pymerge.merge(cfg, tmp_path / "out", out_shard_size=15_000)
    out = _load_dir(tmp_path / "out")
    base, models = _inputs(family)
    assert set(out) == set(base)
    assert report.tensors == len(base)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    for name in base:
        want = expect(name, base[name], [m[name] for m in models])
        assert out[name].dtype == torch.bfloat16
        torch.testing.assert_close(out[name], want, rtol=0, atol=0, msg=f"{method}: {name}")


def test_slerp(family, tmp_path):
    cfg = _config(family, "slerp", params={"t": [{"filter": "mlp", "value": 0.8}, {"value": 0.3}]},
                  models=[family.base, family.models[1]])
    pymerge.merge(cfg, tmp_path / "out")
    out = _load_dir(tmp_path / "out")
    base, models = _inputs(family)
    for name in base:
        t = 0.8 if "mlp" in name else 0.3
        torch.testing.assert_close(out[name], ref.slerp(base[name], models[1][name], t), rtol=0, atol=0)


def test_ties_model_scope_matches_whole_model_oracle(family, tmp_path):
    cfg = _config(family, "ties", per_model={"density": 0.4}, params={"scope": "model", "merge": "dis-mean"})
    pymerge.merge(cfg, tmp_path / "out")
    out = _load_dir(tmp_path / "out")
    base, models = _inputs(family)
    want = ref.ties_model_scope(base, models, 0.4, merge="dis-mean")
    for name in base:
        torch.testing.assert_close(out[name], want[name], rtol=0, atol=0, msg=name)


def test_pcb_model_scope_matches_whole_model_oracle(family, tmp_path):
    cfg = _config(family, "pcb", params={"density": 0.2, "clip_ratio": 0.05})
    pymerge.merge(cfg, tmp_path / "out")
    out = _load_dir(tmp_path / "out")
    base, models = _inputs(family)
    want = ref.pcb_merge_model(base, models, density=0.2, clip_ratio=0.05)
    for name in base:
        torch.testing.assert_close(out[name], want[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("scope", ["tensor_mean_sum", "model"])
def test_emr_folder_reconstructs_every_task(family, tmp_path, scope):
    cfg = _config(family, "emr", params={"rescale_scope": scope})
    pymerge.merge(cfg, tmp_path / "emr")
    meta = json.loads((tmp_path / "emr" / "emr.json").read_text())
    base, models = _inputs(family)
    u, masks, lambdas = ref.emr_merge_model(base, models, rescale_scope=scope)
    assert meta["lambdas"] == pytest.approx(lambdas, rel=1e-12)
    emr = pymerge.emr.load(tmp_path / "emr")
    for task in range(3):
        pymerge.cli.main(["emr", "reconstruct", str(tmp_path / "emr"), "--task", str(task), str(tmp_path / f"t{task}")])
        got = _load_dir(tmp_path / f"t{task}")
        assert json.loads((tmp_path / f"t{task}" / "config.json").read_text())["model_type"] == "llama"
        for name in base:
            want = ref.emr_reconstruct(base[name], u[name], masks[name][task], lambdas[task])
            torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(emr.tensor(name, task), want, rtol=0, atol=0)
    # switching a loaded model's tensors in place, back and forth, matches a fresh reconstruction
    state = emr.state_dict(0)
    emr.switch_task(state, 2)
    emr.switch_task(state, 1)
    for name in base:
        torch.testing.assert_close(state[name], emr.tensor(name, 1), rtol=0, atol=0)
    emr.close()


def test_output_is_a_loadable_checkpoint(family, tmp_path):
    cfg = _config(family, "ties", per_model={"density": 0.5})
    pymerge.merge(cfg, tmp_path / "out", out_shard_size=30_000)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _load_dir(out).values())
    assert (out / "tokenizer_config.json").is_file()
    assert not (out / ".pymerge-partial").exists()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 50) and torch.isfinite(logits).all()


def test_out_dtype_and_config(family, tmp_path):
    cfg = _config(family, "linear", dtype="float16")
    pymerge.merge(cfg, tmp_path / "out")
    out = _load_dir(tmp_path / "out")
    assert all(t.dtype == torch.float16 for t in out.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_report_names_the_backend(family, tmp_path):
    report = pymerge.merge(_config(family, "task_arithmetic"), tmp_path / "out", backend="torch")
    assert report.backends == {"torch": len(_inputs(family)[0])}
    assert report.bytes_read > 0 and report.seconds > 0 and report.peak_rss_bytes > 0
