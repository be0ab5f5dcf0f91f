"""An interrupted merge, started again, skips the complete shards and gives the same bytes."""

import pytest

import pymerge
import pymerge.engine as engine


def _cfg(family, method="dare_ties"):
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(m), "parameters": {"density": 0.5} if method == "dare_ties" else {}} for m in family.models],
        "seed": 3,
    }


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", ["dare_ties", "emr"])
def test_resume_is_bit_identical(family, tmp_path, monkeypatch, method):
    pymerge.merge(_cfg(family, method), tmp_path / "clean", out_shard_size=20_000)
    clean = _files(tmp_path / "clean")

    calls = {"n": 0}
    real = engine._Merge._call

    def crash_midway(self, fn, *args):
        if fn.__name__ == "merge":
            calls["n"] += 1
            if calls["n"] == 12:
                raise KeyboardInterrupt
        return real(self, fn, *args)

    monkeypatch.setattr(engine._Merge, "_call", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        pymerge.merge(_cfg(family, method), tmp_path / "out", out_shard_size=20_000)
    partial = tmp_path / "out" / ".pymerge-partial"
    done_before = {p.name for p in partial.glob("*.safetensors")}
    assert done_before, "some shards completed before the crash"
    assert not (tmp_path / "out" / "config.json").exists()
    monkeypatch.undo()

    report = pymerge.merge(_cfg(family, method), tmp_path / "out", out_shard_size=20_000)
    assert report.resumed_tensors > 0
    assert _files(tmp_path / "out") == clean
