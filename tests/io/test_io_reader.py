import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pymerge.errors import CheckpointError
from pymerge.testing import run_in_threads
from pymerge.io import (
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    CheckpointReader,
    dtype_from_safetensors,
    dtype_to_safetensors,
    read_safetensors_header,
)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(6, 4, generator=g),
        "layers.0.attn.q.weight": torch.randn(4, 4, generator=g).to(torch.float16),
        "layers.0.attn.k.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.randn(4, generator=g),
        "lm_head.weight": torch.randn(6, 4, generator=g),
        "position_ids": torch.arange(8, dtype=torch.int64),
    }


def _header_order(path):
    """Tensor names of a safetensors file by data offset, parsed independently of the reader."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8 : 8 + n])
    hdr.pop("__metadata__", None)
    return sorted(hdr, key=lambda k: hdr[k]["data_offsets"][0])


def _sharded(folder, tensors, groups):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    n = len(groups)
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names}, folder / fname)
        weight_map.update({k: fname for k in names})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))})
    )
    return folder


def _assert_same(reader, tensors):
    assert set(reader.names()) == set(tensors)
    for k, t in tensors.items():
        assert k in reader
        assert reader.shape(k) == tuple(t.shape)
        assert reader.dtype(k) == t.dtype
        assert reader.nbytes(k) == t.numel() * t.element_size()
        got = reader.get(k)
        assert got.dtype == t.dtype
        assert torch.equal(got, t)


def test_single_file_folder(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 4}')
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "generation_config.json", "tokenizer.model", "added_tokens.json"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "README.md").write_text("not copied")
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, t)
        assert r.names() == _header_order(tmp_path / "model.safetensors")
        assert "missing" not in r
        assert r.config() == {"model_type": "llama", "hidden_size": 4}
        copied = {p.name for p in r.files_to_copy()}
        assert copied == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                          "merges.txt", "generation_config.json", "tokenizer.model", "added_tokens.json"}
        assert r.path == tmp_path
        with pytest.raises(KeyError, match="missing"):
            r.get("missing")


def test_single_safetensors_file_path(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "weights.safetensors")
    with CheckpointReader(tmp_path / "weights.safetensors") as r:
        _assert_same(r, t)
        assert r.config() is None
        assert r.files_to_copy() == []


def test_sharded_with_index_and_name_order(tmp_path):
    t = _tensors()
    # Index lists names alphabetically; reading order must follow shards, then offsets.
    groups = [["lm_head.weight", "position_ids"], ["embed.weight", "layers.0.attn.q.weight"],
              ["layers.0.attn.k.weight", "layers.0.norm.weight"]]
    folder = _sharded(tmp_path / "m", t, groups)
    save_file({"stray": torch.zeros(1)}, folder / "other.safetensors")  # ignored: not in the index
    with CheckpointReader(folder) as r:
        _assert_same(r, t)
        expected = []
        for i in range(3):
            expected += _header_order(folder / f"model-{i + 1:05d}-of-00003.safetensors")
        assert r.names() == expected
        assert r.file_of("embed.weight").name == "model-00002-of-00003.safetensors"
        assert [f.name for f in r.files()] == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
        assert r.config() is None


def test_several_files_without_index(tmp_path):
    t = _tensors()
    names = list(t)
    save_file({k: t[k] for k in names[:3]}, tmp_path / "a.safetensors")
    save_file({k: t[k] for k in names[3:]}, tmp_path / "b.safetensors")
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, t)
        assert r.names() == _header_order(tmp_path / "a.safetensors") + _header_order(tmp_path / "b.safetensors")


def test_duplicate_names_without_index(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'w'.*a\.safetensors.*b\.safetensors"):
        CheckpointReader(tmp_path)


def test_bin_weights_only(tmp_path):
    t = _tensors()
    torch.save(t, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, t)
        assert r.names() == list(t)


def test_bin_index(tmp_path):
    t = _tensors()
    names = list(t)
    torch.save({k: t[k] for k in names[:2]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: t[k] for k in names[2:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {k: ("pytorch_model-00001-of-00002.bin" if i < 2 else "pytorch_model-00002-of-00002.bin")
          for i, k in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, t)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create the marker file.
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "evil": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*refused") as ei:
        CheckpointReader(tmp_path)
    assert not marker.exists()
    assert "weights_only=False" not in str(ei.value)


def test_corrupt_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: failed to load"):
        CheckpointReader(tmp_path)


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        CheckpointReader(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found: .*nope"):
        CheckpointReader(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        CheckpointReader(tmp_path)


def test_missing_shard_named_by_index(tmp_path):
    t = _tensors()
    folder = _sharded(tmp_path / "m", t, [list(t)[:3], list(t)[3:]])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*not found"):
        CheckpointReader(folder)


def test_index_entry_not_in_shard(tmp_path):
    t = _tensors()
    folder = _sharded(tmp_path / "m", t, [list(t)[:3], list(t)[3:]])
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"'ghost\.weight'.*model-00001-of-00002"):
        CheckpointReader(folder)


def test_index_bad_json(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*invalid JSON"):
        CheckpointReader(tmp_path)


def _raw(header, data: bytes, header_len=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data


_F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}

CORRUPT = {
    "garbage": (b"\xde\xad\xbe\xef" * 16, "header length"),
    "tiny": (b"\x01\x02\x03", "not a safetensors file"),
    "header_len_too_big": (_raw(b'{"a":1}', b"", header_len=10**6), "exceeds the file size"),
    "bad_json": (_raw(b"{not json}", b"\0" * 16), "invalid JSON"),
    "not_utf8": (_raw(b"\xff\xfe\xfd\xfc", b""), "invalid JSON"),
    "not_object": (_raw(b"[1, 2]", b""), "not a JSON object"),
    "missing_dtype": (_raw({"a": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16), "lacks dtype"),
    "unknown_dtype": (_raw({"a": {**_F32x4, "dtype": "Q7"}}, b"\0" * 16), "unsupported dtype"),
    "bad_shape": (_raw({"a": {**_F32x4, "shape": [-4]}}, b"\0" * 16), "invalid shape"),
    "offsets_vs_shape": (_raw({"a": {**_F32x4, "data_offsets": [0, 12]}}, b"\0" * 16), "needs 16"),
    "offsets_reversed": (_raw({"a": {**_F32x4, "data_offsets": [16, 0]}}, b"\0" * 16), "invalid data_offsets"),
    "offsets_out_of_range": (
        _raw({"a": {**_F32x4, "data_offsets": [1000, 1016]}}, b"\0" * 16), "outside the data region"),
    "overlap": (
        _raw({"a": _F32x4, "b": {**_F32x4, "data_offsets": [8, 24]}}, b"\0" * 24), "overlaps"),
    "gap": (_raw({"a": {**_F32x4, "data_offsets": [8, 24]}}, b"\0" * 24), "unused bytes"),
    "trailing": (_raw({"a": _F32x4}, b"\0" * 20), "follow the last tensor"),
    "bad_metadata": (_raw({"__metadata__": {"k": 1}, "a": _F32x4}, b"\0" * 16), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_header(tmp_path, case):
    blob, msg = CORRUPT[case]
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(tmp_path)
    assert "model.safetensors" in str(ei.value)
    assert msg in str(ei.value)


def test_corrupt_shard_in_index_is_named(tmp_path):
    t = _tensors()
    folder = _sharded(tmp_path / "m", t, [list(t)[:3], list(t)[3:]])
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 40)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        CheckpointReader(folder)


def test_truncated_shard(tmp_path):
    t = _tensors()
    folder = _sharded(tmp_path / "m", t, [list(t)[:3], list(t)[3:]])
    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: shard is truncated"):
        CheckpointReader(folder)


def test_valid_header_matches_library(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt"})
    infos, meta = read_safetensors_header(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    assert list(infos) == _header_order(tmp_path / "x.safetensors")
    for k, info in infos.items():
        assert info.shape == tuple(t[k].shape) and info.dtype == t[k].dtype


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8, torch.bool],
)
def test_dtype_round_trip(tmp_path, dtype):
    x = (torch.randn(3, 5) * 50)
    x = x > 0 if dtype == torch.bool else x.to(dtype)
    save_file({"x": x, "empty": torch.empty(0, 3, dtype=dtype), "scalar": x[0, 0].clone()},
              tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:
        assert r.dtype("x") == dtype
        assert torch.equal(r.get("x"), x)
        assert r.shape("empty") == (0, 3) and r.nbytes("empty") == 0 and r.get("empty").shape == (0, 3)
        assert r.shape("scalar") == () and torch.equal(r.get("scalar"), x[0, 0])
    assert dtype_from_safetensors(dtype_to_safetensors(dtype)) == dtype


def test_dtype_maps_are_inverse():
    for st, dt in SAFETENSORS_DTYPES.items():
        assert TORCH_TO_SAFETENSORS[dt] == st
    assert SAFETENSORS_DTYPES["BF16"] is torch.bfloat16
    with pytest.raises(KeyError):
        dtype_from_safetensors("Q7")


def test_concurrent_get(tmp_path):
    t = {f"w{i}": torch.full((64,), float(i)) for i in range(32)}
    _sharded(tmp_path, t, [list(t)[:16], list(t)[16:]])
    with CheckpointReader(tmp_path) as r:
        def work(offset):
            for j in range(200):
                k = f"w{(j + offset) % 32}"
                assert torch.equal(r.get(k), t[k])

        run_in_threads(work, 4)


def test_get_after_close(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    r = CheckpointReader(tmp_path)
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.get("w")


def test_bad_config_json(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{broken")
    with CheckpointReader(tmp_path) as r, pytest.raises(CheckpointError, match=r"config\.json"):
        r.config()


def _big_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Odd sizes put most tensors at offsets that are not page aligned.
    return {
        "a": torch.randn(3, 1001, generator=g).to(torch.bfloat16),
        "b": torch.randn(517, 33, generator=g),
        "c": torch.randn(2049, generator=g).to(torch.float16),
        "d": torch.empty(0, 4),
        "e": torch.randn(1, generator=g),
    }


def _mapped_regions(path):
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize("mapped", [True, False])
def test_mapped_and_positional_reads_agree(tmp_path, monkeypatch, mapped):
    import pymerge.io.reader as reader_mod

    t = _big_tensors()
    save_file(t, tmp_path / "model.safetensors")
    monkeypatch.setattr(reader_mod, "_map_populate", mapped and reader_mod._map_populate)
    with CheckpointReader(tmp_path) as r:
        for k, x in t.items():
            y = r.get(k)
            assert y.dtype == x.dtype and y.shape == x.shape and torch.equal(y, x)
            assert y.is_contiguous()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_mapped_tensor_is_private_and_unmapped_when_freed(tmp_path):
    t = _big_tensors()
    path = tmp_path / "model.safetensors"
    save_file(t, path)
    before = path.read_bytes()
    with CheckpointReader(tmp_path) as r:
        y = r.get("b")
        assert _mapped_regions(path) == 1
        y.fill_(7.0)  # lands in a private copy
        assert torch.equal(r.get("b"), t["b"])
        del y
        assert _mapped_regions(path) == 0
    assert path.read_bytes() == before


@pytest.mark.parametrize("mapped", [True, False])
def test_shard_truncated_after_open(tmp_path, monkeypatch, mapped):
    import pymerge.io.reader as reader_mod

    t = _big_tensors()
    path = tmp_path / "model.safetensors"
    save_file(t, path)
    monkeypatch.setattr(reader_mod, "_map_populate", mapped and reader_mod._map_populate)
    with CheckpointReader(tmp_path) as r:
        last = max(r.names(), key=lambda k: r.info(k).offset)
        # Cut the file well inside the last tensor's pages.
        os_size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(os_size - r.info(last).nbytes // 2 - 8192)
        with pytest.raises(CheckpointError, match="unexpected end of file"):
            r.get(last)


def test_reads_fall_back_when_populate_is_refused(tmp_path, monkeypatch):
    import pymerge.io.reader as reader_mod

    if not reader_mod._map_populate:
        pytest.skip("memory-mapped reads are not used on this platform")
    t = _big_tensors()
    save_file(t, tmp_path / "model.safetensors")
    monkeypatch.setattr(reader_mod, "_MADV_POPULATE_READ", 0x7FFF)  # an advice madvise refuses: EINVAL
    monkeypatch.setattr(reader_mod, "_map_populate", True)
    with CheckpointReader(tmp_path) as r:
        assert torch.equal(r.get("a"), t["a"])
        assert reader_mod._map_populate is False
        assert torch.equal(r.get("b"), t["b"])
