"""Bad input gets a clear, specific error and leaves no finished-looking output."""

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.errors import CheckpointError, ConfigError, InputMismatchError, NonFiniteError, OutputError
from pymerge.synthetic import llama_family


@pytest.fixture
def fam(tmp_path):
    """A private copy of a tiny family that a test may damage."""
    return llama_family(tmp_path / "models", n_models=2, layers=1, hidden=16, intermediate=24, heads=2, kv_heads=1,
                        vocab=20, shards=2, seed=3)


def _cfg(fam, method="ties", **extra):
    return {
        "merge_method": method,
        "base_model": str(fam.base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0} if method == "linear" else {"density": 0.5, "weight": 1.0}}
                   for m in fam.models],
        **extra,
    }


def _assert_nothing_finished(out):
    if not out.exists():
        return
    top = {p.name for p in out.iterdir()} - {".pymerge-partial"}
    assert not top, f"finished-looking files left in {out}: {top}"


def _shard(model_dir, k=0):
    return sorted(model_dir.glob("*.safetensors"))[k]


def _rewrite(model_dir, fn):
    """Apply fn to the tensors of the shard holding the MLP up projection and save it back."""
    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        if "model.layers.0.mlp.up_proj.weight" in tensors:
            fn(tensors)
            save_file(tensors, shard, metadata={"format": "pt"})
            return


def test_missing_model_folder(fam, tmp_path):
    cfg = _cfg(fam)
    cfg["models"][1]["model"] = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="nope"):
        pymerge.merge(cfg, tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")


def test_tensor_missing_from_one_model(fam, tmp_path):
    _rewrite(fam.models[1], lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    index = fam.models[1] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(InputMismatchError, match=r"model.layers.0.mlp.up_proj.weight: missing from .*model_1"):
        pymerge.merge(_cfg(fam), tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")


def test_shape_mismatch(fam, tmp_path):
    _rewrite(fam.models[0], lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 16, dtype=torch.bfloat16)))
    with pytest.raises(InputMismatchError, match=r"up_proj.weight: shapes differ: \(24, 16\) in base_model.*\(3, 16\) in"):
        pymerge.merge(_cfg(fam), tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")


def test_truncated_shard(fam, tmp_path):
    shard = _shard(fam.models[0])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=shard.name):
        pymerge.merge(_cfg(fam), tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")


def test_corrupt_header(fam, tmp_path):
    shard = _shard(fam.models[1], 1)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        pymerge.merge(_cfg(fam), tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input(fam, tmp_path, bad):
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 4] = bad

    _rewrite(fam.models[1], poison)
    with pytest.raises(NonFiniteError, match=r"model.layers.0.mlp.up_proj.weight in .*model_1.*--allow-nonfinite"):
        pymerge.merge(_cfg(fam, "linear"), tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")
    pymerge.merge(_cfg(fam, "linear"), tmp_path / "out", allow_nonfinite=True)
    merged = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(f))
    assert not torch.isfinite(merged["model.layers.0.mlp.up_proj.weight"][3, 4])


def test_unknown_method_and_parameter(fam, tmp_path):
    with pytest.raises(ConfigError, match="della"):
        pymerge.merge(_cfg(fam, "della"), tmp_path / "out")
    cfg = _cfg(fam)
    cfg["models"][0]["parameters"]["densty"] = 0.3
    with pytest.raises(ConfigError, match="densty"):
        pymerge.merge(cfg, tmp_path / "out")
    _assert_nothing_finished(tmp_path / "out")


def test_full_disk(fam, tmp_path, monkeypatch):
    """An ENOSPC while a shard is written: a clear error, no finished-looking output, and a later run completes."""
    import pymerge.io.writer as writer_mod

    real_open = open
    written = {"n": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            written["n"] += 1
            if written["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and str(path).endswith(".partial") else f

    monkeypatch.setattr(writer_mod, "open", fake_open, raising=False)
    with pytest.raises(OutputError, match="(?i)disk.*full|no space"):
        pymerge.merge(_cfg(fam), tmp_path / "out", out_shard_size=2_000)
    _assert_nothing_finished(tmp_path / "out")
    monkeypatch.undo()
    pymerge.merge(_cfg(fam), tmp_path / "out", out_shard_size=2_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_existing_output_is_not_overwritten(fam, tmp_path):
    pymerge.merge(_cfg(fam, "linear"), tmp_path / "out")
    with pytest.raises(OutputError, match="overwrite"):
        pymerge.merge(_cfg(fam, "linear"), tmp_path / "out")
    pymerge.merge(_cfg(fam, "linear"), tmp_path / "out", overwrite=True)


def test_pickled_checkpoint_loads_only_weights(fam, tmp_path):
    """A .bin checkpoint is read with weights_only=True; one holding code is refused."""
    from pymerge.io import CheckpointReader

    folder = tmp_path / "binmodel"
    shutil.copytree(fam.base, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    with CheckpointReader(folder) as r:
        assert torch.equal(r.get("w"), torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    torch.save({"w": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        CheckpointReader(folder).names()
    assert not (tmp_path / "pwned").exists()
