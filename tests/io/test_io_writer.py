import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pymerge.io.writer as writer_mod
from pymerge.errors import OutputError
from pymerge.io import PARTIAL_DIR, PROGRESS_FILE, CheckpointReader, CheckpointWriter, shard_plan


def _model(seed=0, n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(4, 4, generator=g).to(dtype) for i in range(n)}  # 64 B each in f32


def _plan(tensors):
    return [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def _write(out, tensors, *, fingerprint="fp", config=None, copy_files=(), extra_files=None, **kw):
    w = CheckpointWriter(out, _plan(tensors), fingerprint=fingerprint, **kw)
    done = w.completed_names()
    for k, v in tensors.items():
        if k not in done:
            w.add(k, v)
    w.finalize(config, list(copy_files), extra_files)
    return w


def _files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def _load_all(folder):
    with CheckpointReader(folder) as r:
        return {k: r.get(k).clone() for k in r.names()}


def test_one_shard(tmp_path):
    t = _model()
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"tok": 1}')
    out = tmp_path / "out"
    _write(out, t, config={"model_type": "llama"}, copy_files=[src / "tokenizer.json"],
           max_shard_bytes=10**6)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_file(out / "model.safetensors")
    assert loaded.keys() == t.keys()
    for k in t:
        assert torch.equal(loaded[k], t[k])
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(t)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama"}
    assert (out / "tokenizer.json").read_text() == '{"tok": 1}'
    # Header layout: 8-byte length, space-padded to a multiple of 8.
    raw = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    assert json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}


def test_several_shards_and_index(tmp_path):
    t = _model(n=7)
    out = tmp_path / "out"
    w = _write(out, t, max_shard_bytes=150, extra_files={"merge_config.yml": b"method: ties\n"})
    # 64-byte tensors, 150-byte limit: two per shard.
    assert [len(names) for _, names in w.shard_files] == [2, 2, 2, 1]
    shards = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["merge_config.yml", "model.safetensors.index.json"])
    assert (out / "merge_config.yml").read_bytes() == b"method: ties\n"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 7 * 64
    names = list(t)
    assert index["weight_map"] == {k: shards[i // 2] for i, k in enumerate(names)}
    merged = {}
    for s in shards:
        part = load_file(out / s)
        assert sum(v.numel() * v.element_size() for v in part.values()) <= 150
        merged.update(part)
    assert merged.keys() == t.keys() and all(torch.equal(merged[k], t[k]) for k in t)
    got = _load_all(out)
    assert list(got) == names and all(torch.equal(got[k], t[k]) for k in t)


def test_tensor_bigger_than_limit_gets_own_shard(tmp_path):
    t = {"a": torch.ones(4), "big": torch.arange(100, dtype=torch.float32), "b": torch.zeros(4), "c": torch.ones(2)}
    w = _write(tmp_path / "out", t, max_shard_bytes=40)
    assert [names for _, names in w.shard_files] == [["a"], ["big"], ["b", "c"]]
    got = _load_all(tmp_path / "out")
    assert all(torch.equal(got[k], t[k]) for k in t)


def test_shard_plan():
    assert shard_plan([], 10) == [[]]
    assert shard_plan([5, 5, 5], 10) == [[0, 1], [2]]
    assert shard_plan([20, 1, 1], 10) == [[0], [1, 2]]
    assert shard_plan([1, 20, 1], 10) == [[0], [1], [2]]
    assert shard_plan([0, 10, 0, 1], 10) == [[0, 1, 2], [3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_dtypes_empty_and_scalar(tmp_path, dtype):
    x = torch.randn(3, 5) * 20
    x = x > 0 if dtype == torch.bool else x.to(dtype)
    t = {"x": x, "empty": torch.empty(0, 7, dtype=dtype), "scalar": x[1, 2].clone(), "strided": x.t()}
    _write(tmp_path / "out", t)
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    for k in t:
        assert loaded[k].dtype == dtype and loaded[k].shape == t[k].shape
        assert torch.equal(loaded[k], t[k])


def test_bytes_match_library_layout(tmp_path):
    # With names already in the library's order, our file equals safetensors' own output.
    t = {"a": torch.randn(3, 4), "b": torch.randn(5), "c": torch.randn(2, 2)}
    save_file(t, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    _write(tmp_path / "out", t)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_empty_plan(tmp_path):
    _write(tmp_path / "out", {})
    assert load_file(tmp_path / "out" / "model.safetensors") == {}


def test_nothing_visible_before_finalize(tmp_path):
    t = _model()
    out = tmp_path / "a" / "b" / "out"  # created, parents included
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150)
    for k, v in t.items():
        w.add(k, v)
    assert [p.name for p in out.iterdir()] == [PARTIAL_DIR]
    w.finalize({"x": 1}, [])
    assert not (out / PARTIAL_DIR).exists()
    assert (out / "model.safetensors.index.json").exists()


def _abort_after(out, t, n_added, fingerprint="fp", max_shard_bytes=150):
    w = CheckpointWriter(out, _plan(t), fingerprint=fingerprint, max_shard_bytes=max_shard_bytes)
    for k in list(t)[:n_added]:
        w.add(k, t[k])
    w.abort()
    return w


def _opened_shards(monkeypatch):
    opened = []
    real = writer_mod._open_shard_file

    def spy(path):
        opened.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(writer_mod, "_open_shard_file", spy)
    return opened


def test_resume_after_abort(tmp_path, monkeypatch):
    t = _model(n=8)
    ref = tmp_path / "ref"
    _write(ref, t, max_shard_bytes=150, config={"c": 1})

    out = tmp_path / "out"
    _abort_after(out, t, 5)  # shards 1 and 2 complete, shard 3 half written
    partial = out / PARTIAL_DIR
    assert sorted(p.name for p in partial.iterdir()) == [
        "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", PROGRESS_FILE]
    progress = json.loads((partial / PROGRESS_FILE).read_text())
    assert progress["fingerprint"] == "fp" and set(progress["shards"]) == {
        "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"}
    mtimes = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.safetensors")}

    opened = _opened_shards(monkeypatch)
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150)
    assert w.completed_names() == set(list(t)[:4])
    assert w.pending_names() == list(t)[4:]
    for k in w.pending_names():
        w.add(k, t[k])
    assert {p.name: p.stat().st_mtime_ns for p in partial.glob("model-0000[12]*")} == mtimes
    w.finalize({"c": 1}, [])
    assert opened == ["model-00003-of-00004.safetensors.partial", "model-00004-of-00004.safetensors.partial"]
    assert _files(out) == _files(ref)
    assert sorted(p.name for p in out.iterdir()) == sorted(_files(ref))


def test_resume_recomputes_corrupted_shard(tmp_path, monkeypatch):
    t = _model(n=8)
    ref = tmp_path / "ref"
    _write(ref, t, max_shard_bytes=150)
    out = tmp_path / "out"
    _abort_after(out, t, 6)  # three shards complete
    bad = out / PARTIAL_DIR / "model-00002-of-00004.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    bad.write_bytes(bytes(data))

    opened = _opened_shards(monkeypatch)
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150)
    names = list(t)
    assert w.completed_names() == set(names[:2] + names[4:6])
    assert w.pending_names() == names[2:4] + names[6:]
    with pytest.raises(ValueError, match="plan order"):
        w.add(names[6], t[names[6]])
    for k in w.pending_names():
        w.add(k, t[k])
    w.finalize(None, [])
    assert opened == ["model-00002-of-00004.safetensors.partial", "model-00004-of-00004.safetensors.partial"]
    assert _files(out) == _files(ref)


def test_resume_drops_truncated_completed_shard(tmp_path):
    t = _model(n=4)
    out = tmp_path / "out"
    _abort_after(out, t, 2)
    shard = out / PARTIAL_DIR / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150)
    assert w.completed_names() == set()
    assert not shard.exists()
    w.abort()


def test_fingerprint_change_discards(tmp_path):
    t = _model(n=8)
    out = tmp_path / "out"
    _abort_after(out, t, 5, fingerprint="old")
    stale = out / PARTIAL_DIR / "model-00001-of-00004.safetensors"
    assert stale.exists()
    w = CheckpointWriter(out, _plan(t), fingerprint="new", max_shard_bytes=150)
    assert w.completed_names() == set()
    assert not stale.exists()
    assert json.loads((out / PARTIAL_DIR / PROGRESS_FILE).read_text())["fingerprint"] == "new"
    w.abort()


def test_plan_change_discards(tmp_path):
    t = _model(n=8)
    out = tmp_path / "out"
    _abort_after(out, t, 5)
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=300)  # other layout
    assert w.completed_names() == set()
    w.abort()


def test_add_checks(tmp_path):
    t = _model(n=3)
    w = CheckpointWriter(tmp_path / "out", _plan(t), fingerprint="fp")
    names = list(t)
    with pytest.raises(ValueError, match="plan order"):
        w.add(names[1], t[names[1]])
    with pytest.raises(ValueError, match="shape"):
        w.add(names[0], torch.zeros(4, 5))
    with pytest.raises(ValueError, match="dtype"):
        w.add(names[0], t[names[0]].half())
    with pytest.raises(ValueError, match="before every tensor"):
        w.finalize(None, [])
    for k in names:
        w.add(k, t[k])
    with pytest.raises(ValueError, match="after every planned tensor"):
        w.add("extra", torch.zeros(1))
    w.finalize(None, [])
    with pytest.raises(ValueError, match="finalized"):
        w.add(names[0], t[names[0]])


def test_finalize_rejects_clashing_file_names(tmp_path):
    w = CheckpointWriter(tmp_path / "out", [], fingerprint="f")
    with pytest.raises(ValueError, match="model.safetensors"):
        w.finalize(None, [], {"model.safetensors": b"x"})


def test_plan_validation(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        CheckpointWriter(tmp_path / "o", [("a", (1,), torch.float32), ("a", (1,), torch.float32)], fingerprint="f")
    with pytest.raises(ValueError, match="dtype"):
        CheckpointWriter(tmp_path / "o", [("a", (1,), torch.complex128)], fingerprint="f")


class _FullDisk:
    """File wrapper that fails like a full disk once `budget` bytes are written."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full(tmp_path, monkeypatch):
    t = _model(n=8)
    out = tmp_path / "out"
    real = writer_mod._open_shard_file
    calls = []

    def open_shard(path):
        calls.append(path)
        f = real(path)
        return f if len(calls) < 3 else _FullDisk(f, 100)  # third shard runs out of space

    monkeypatch.setattr(writer_mod, "_open_shard_file", open_shard)
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150)
    with pytest.raises(OutputError) as ei:
        for k, v in t.items():
            w.add(k, v)
    msg = str(ei.value)
    assert "disk full" in msg and "model-00003-of-00004.safetensors" in msg and str(out) in msg
    w.abort()
    # Nothing finished-looking: only the partial folder, holding the two complete shards.
    assert [p.name for p in out.iterdir()] == [PARTIAL_DIR]
    assert sorted(p.name for p in (out / PARTIAL_DIR).iterdir()) == [
        "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors", PROGRESS_FILE]

    monkeypatch.setattr(writer_mod, "_open_shard_file", real)
    w = CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150)
    assert w.completed_names() == set(list(t)[:4])


def test_overwrite_protection(tmp_path):
    t = _model(n=4)
    out = tmp_path / "out"
    _write(out, t, max_shard_bytes=150, config={"v": 1})
    with pytest.raises(OutputError, match="overwrite"):
        CheckpointWriter(out, _plan(t), fingerprint="fp")
    (out / "README.md").write_text("kept")

    t2 = _model(seed=1, n=4)
    w = CheckpointWriter(out, _plan(t2), fingerprint="fp2", overwrite=True)
    for k, v in t2.items():
        w.add(k, v)
    # The old checkpoint stays whole until finalize.
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "model-00001-of-00002.safetensors").exists()
    w.finalize({"v": 2}, [])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    got = _load_all(out)
    assert all(torch.equal(got[k], t2[k]) for k in t2)
    assert json.loads((out / "config.json").read_text()) == {"v": 2}


def test_existing_folder_without_checkpoint_is_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("hi")
    _write(out, _model(n=2))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]


def test_output_path_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        CheckpointWriter(tmp_path / "out", [], fingerprint="f")


def test_context_manager_aborts_on_error(tmp_path):
    t = _model(n=4)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, _plan(t), fingerprint="fp", max_shard_bytes=150) as w:
            for k in list(t)[:3]:
                w.add(k, t[k])
            raise RuntimeError("merge failed")
    assert [p.name for p in out.iterdir()] == [PARTIAL_DIR]
    assert not list((out / PARTIAL_DIR).glob("*.partial"))


def _rank_writer(out, tensors, rank, world, **kw):
    w = CheckpointWriter(out, _plan(tensors), fingerprint="fp", max_shard_bytes=128, rank=rank, world_size=world, **kw)
    for k in w.pending_names():
        w.add(k, tensors[k])
    return w


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_their_shards_and_rank0_finalizes_the_same_checkpoint(tmp_path, world):
    t = _model(n=9)
    _write(tmp_path / "single", t, config={"a": 1}, max_shard_bytes=128)
    out = tmp_path / "out"
    writers = [_rank_writer(out, t, r, world) for r in range(world)]
    owners = {writers[0].owner_of(k) for k in t}
    assert owners == set(range(world))  # every rank has a share
    for w in writers[1:]:
        w.finish_shards()
        with pytest.raises(ValueError, match="does not finalize"):
            w.finalize({"a": 1})
    assert not (out / "model-00001-of-00005.safetensors").exists()  # nothing installed yet
    writers[0].finalize({"a": 1})
    assert _files(out) == _files(tmp_path / "single")


def test_rank0_refuses_to_finalize_without_every_rank_shard(tmp_path):
    t = _model(n=8)
    out = tmp_path / "out"
    w0 = _rank_writer(out, t, 0, 2)
    with pytest.raises(OutputError, match="of rank 1 is missing"):
        w0.finalize(None)
    assert [p.name for p in out.iterdir()] == [PARTIAL_DIR]
