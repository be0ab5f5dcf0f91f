"""Checkpoint reader: safetensors shards (with or without an index) and weights-only .bin files.

Opening a checkpoint validates every file cheaply (headers only, parsed here rather than
trusting the library) so that a broken input fails before any merge work starts. Tensor
data is read lazily, one tensor at a time: a private memory map of the tensor's bytes
(see _SafetensorsShard), or a positional read into pinned memory for a GPU.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pymerge import hostmem
from pymerge.errors import CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "TORCH_TO_SAFETENSORS",
    "SAFETENSORS_INDEX",
    "BIN_INDEX",
    "CheckpointReader",
    "TensorInfo",
    "dtype_from_safetensors",
    "dtype_to_safetensors",
    "read_safetensors_header",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Same cap as the safetensors library: a larger header is corrupt, not a big model.
MAX_HEADER_BYTES = 100_000_000


def _build_dtype_map() -> dict[str, torch.dtype]:
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "BOOL": "bool",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
    }
    # Older torch builds lack some of the unsigned and float8 types.
    return {st: getattr(torch, tn) for st, tn in names.items() if hasattr(torch, tn)}


#: safetensors dtype string -> torch dtype.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = _build_dtype_map()
#: torch dtype -> safetensors dtype string.
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_from_safetensors(name: str) -> torch.dtype:
    """torch dtype for a safetensors dtype string (KeyError if unsupported)."""
    try:
        return SAFETENSORS_DTYPES[name]
    except KeyError:
        raise KeyError(f"unsupported safetensors dtype {name!r}") from None


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    """safetensors dtype string for a torch dtype (KeyError if unsupported)."""
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise KeyError(f"torch dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it looks like."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int  # start within the data region (0 for .bin files)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns ``(tensors, metadata)`` with tensors ordered by data offset. Raises
    CheckpointError naming the file (and tensor) on any inconsistency, including a data
    region shorter than the header claims (a truncated download).
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file (only {file_size} bytes, "
                    "shorter than the 8-byte header length)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: header length {header_len} "
                    f"exceeds the file size ({file_size} bytes)"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: header length {header_len} "
                    f"is larger than the {MAX_HEADER_BYTES}-byte limit"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: truncated while reading the header")

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: top level is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")

    data_len = file_size - 8 - header_len
    entries: list[tuple[int, int, str, tuple[int, ...], torch.dtype]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not a JSON object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}")
        st_dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if st_dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {st_dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{where}: invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{where}: invalid data_offsets {offsets!r}")
        dtype = SAFETENSORS_DTYPES[st_dtype]
        expected = math.prod(shape) * dtype.itemsize
        begin, end = offsets
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes but shape "
                f"{shape} of {st_dtype} needs {expected}"
            )
        entries.append((begin, end, name, tuple(shape), dtype))

    entries.sort(key=lambda e: (e[0], e[1]))
    gap: str | None = None
    cursor = 0
    prev_name = None
    for begin, end, name, _, _ in entries:
        if begin < cursor:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} overlaps tensor {prev_name!r}"
            )
        if begin > cursor and gap is None:
            gap = f"{path}: corrupt safetensors header: {begin - cursor} unused bytes before tensor {name!r}"
        cursor = end
        prev_name = name

    if cursor > data_len:
        if gap is None:
            raise CheckpointError(
                f"{path}: shard is truncated: the header describes {cursor} bytes of tensor data "
                f"but only {data_len} follow the header (file size {file_size})"
            )
        bad = next(e for e in entries if e[1] > data_len)
        raise CheckpointError(
            f"{path}: tensor {bad[2]!r}: data_offsets [{bad[0]}, {bad[1]}] lie outside the "
            f"data region ({data_len} bytes)"
        )
    if gap is not None:
        raise CheckpointError(gap)
    if cursor < data_len:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {data_len - cursor} bytes follow the last tensor's data"
        )

    tensors = {
        name: TensorInfo(name, path, shape, dtype, end - begin, begin)
        for begin, end, name, shape, dtype in entries
    }
    return tensors, metadata


# Small non-weight files that travel with a model (tokenizer, generation defaults).
_COPY_NAMES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "merges.txt",
    "generation_config.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
}
_COPY_PREFIXES = ("vocab.",)
_COPY_SUFFIXES = (".tiktoken",)


def _is_copy_file(name: str) -> bool:
    return name in _COPY_NAMES or name.startswith(_COPY_PREFIXES) or name.endswith(_COPY_SUFFIXES)


def _unpickler_reason(e: Exception) -> str:
    # torch's message suggests retrying with weights_only=False; keep only the cause.
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return text.split(". ", 1)[0].rstrip(".")


class _SafetensorsShard:
    """One safetensors file; each tensor is a private memory map of its own byte range.

    A mapping shares the page cache's pages: no buffer to zero, no copy. Each tensor maps
    only its own range and unmaps when the tensor is freed, so resident memory stays at
    the tensors in flight, as with reads. The pages are faulted in when the tensor is
    read (MADV_POPULATE_READ), on the reading thread, so a cold file is read from disk
    there and the kernels never stall on a fault; a file truncated since it was opened
    is an error there, not a SIGBUS later. The map is private: a write lands in a copy,
    never in the file. Pinned reads (for a GPU) and kernels without MADV_POPULATE_READ
    use positional reads into fresh tensors instead.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY)
            (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
        self.data_start = 8 + header_len

    def read(self, info: "TensorInfo", pin_memory: bool = False) -> torch.Tensor:
        if self.fd is None:
            raise ValueError("file is closed")
        if info.nbytes and not pin_memory and _map_populate:
            try:
                return self._map(info)
            except _NoPopulate:
                _disable_map_populate()
        return self._pread(info, pin_memory)

    def _map(self, info: "TensorInfo") -> torch.Tensor:
        start = self.data_start + info.offset
        page_start = start - start % mmap.ALLOCATIONGRANULARITY
        lead = start - page_start
        try:
            mm = mmap.mmap(
                self.fd, lead + info.nbytes, flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=page_start,
            )
        except ValueError:  # the range passes the end of the file
            raise CheckpointError(f"{self.path}: unexpected end of file reading {info.name!r}") from None
        except OSError:  # a file system without memory maps
            raise _NoPopulate from None
        try:
            mm.madvise(_MADV_POPULATE_READ)
        except OSError as e:
            mm.close()
            if e.errno == errno.EFAULT:
                raise CheckpointError(f"{self.path}: unexpected end of file reading {info.name!r}") from None
            if e.errno == errno.EINVAL:
                raise _NoPopulate from None
            raise
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=lead)
        return flat.view(info.dtype).view(info.shape)

    def _pread(self, info: "TensorInfo", pin_memory: bool) -> torch.Tensor:
        out = hostmem.empty(info.shape, dtype=info.dtype, pin_memory=pin_memory)
        if info.nbytes:
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            pos, offset = 0, self.data_start + info.offset
            while pos < info.nbytes:
                n = os.preadv(self.fd, [buf[pos:]], offset + pos)
                if n == 0:
                    raise CheckpointError(f"{self.path}: unexpected end of file reading {info.name!r}")
                pos += n
        return out

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


# Linux 5.14+; elsewhere (or when madvise refuses it) tensors are read with pread.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_map_populate = sys.platform.startswith("linux") and hasattr(mmap.mmap, "madvise")


class _NoPopulate(Exception):
    pass


def _disable_map_populate() -> None:
    global _map_populate
    _map_populate = False


class CheckpointReader:
    """Read-only view of one model checkpoint (a folder, or a single weights file).

    Layouts, in order of preference: ``model.safetensors.index.json`` + shards; a single
    ``model.safetensors``; several ``*.safetensors`` (union); ``pytorch_model.bin.index.json``
    + shards; a single ``pytorch_model.bin``. Pickled ``.bin`` files are loaded only with
    ``torch.load(weights_only=True)``; nothing else is ever unpickled.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self._shards: dict[Path, _SafetensorsShard] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._folder: Path | None = None
        self._closed = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> None:
        p = self.path
        if p.is_file():
            if p.suffix == ".safetensors":
                self._add_safetensors([p], index=None)
            elif p.suffix == ".bin":
                self._add_bin([p], index=None)
            else:
                raise CheckpointError(f"{p}: not a checkpoint file (expected .safetensors or .bin)")
            return
        if not p.is_dir():
            raise CheckpointError(f"model folder not found: {p}")
        self._folder = p

        if (p / SAFETENSORS_INDEX).is_file():
            index = p / SAFETENSORS_INDEX
            self._add_safetensors(*self._read_index(index))
            return
        if (p / SAFETENSORS_SINGLE).is_file():
            self._add_safetensors([p / SAFETENSORS_SINGLE], index=None)
            return
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if files:
            self._add_safetensors(files, index=None)
            return
        if (p / BIN_INDEX).is_file():
            self._add_bin(*self._read_index(p / BIN_INDEX))
            return
        if (p / BIN_SINGLE).is_file():
            self._add_bin([p / BIN_SINGLE], index=None)
            return
        raise CheckpointError(
            f"{p}: no weights found (expected {SAFETENSORS_INDEX}, *.safetensors, "
            f"{BIN_INDEX} or {BIN_SINGLE})"
        )

    def _read_index(self, index: Path) -> tuple[list[Path], tuple[Path, dict[str, str]]]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: invalid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: missing or invalid 'weight_map' (must map tensor names to files)")
        if not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is empty")
        shard_names = sorted(set(weight_map.values()))
        files = []
        for shard in shard_names:
            rel = Path(shard)
            # Shards live beside the index; refuse paths that escape the folder.
            if rel.is_absolute() or ".." in rel.parts:
                raise CheckpointError(f"{index}: shard path {shard!r} is outside the model folder")
            f = index.parent / rel
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} named by the index not found: {f}")
            files.append(f)
        return files, (index, weight_map)

    def _add_safetensors(self, files: list[Path], index: tuple[Path, dict[str, str]] | None) -> None:
        wanted: dict[Path, set[str]] | None = None
        if index is not None:
            wanted = {}
            for name, shard in index[1].items():
                wanted.setdefault(index[0].parent / shard, set()).add(name)
        for f in files:
            tensors, _ = read_safetensors_header(f)
            if wanted is not None:
                names = wanted.get(f, set())
                absent = sorted(names - tensors.keys())
                if absent:
                    more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                    raise CheckpointError(
                        f"{index[0]}: tensor {absent[0]!r}{more} mapped to shard {f.name!r}, "
                        "which does not contain it"
                    )
                tensors = {n: t for n, t in tensors.items() if n in names}
            for name, info in tensors.items():
                if name in self._infos:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self._infos[name].file} and {f}"
                    )
                self._infos[name] = info
            self._shards[f] = _SafetensorsShard(f)

    def _add_bin(self, files: list[Path], index: tuple[Path, dict[str, str]] | None) -> None:
        for f in files:
            try:
                sd = torch.load(f, weights_only=True, mmap=True, map_location="cpu")
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"{f}: refused to load: the pickle holds objects other than tensors "
                    f"({_unpickler_reason(e)}); only weights-only pickles are read, "
                    "convert it to safetensors where its source is trusted"
                ) from e
            except Exception as e:
                raise CheckpointError(
                    f"{f}: failed to load the pickled checkpoint with torch.load(weights_only=True): "
                    f"{type(e).__name__}: {_unpickler_reason(e)}"
                ) from e
            if not isinstance(sd, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
            ):
                raise CheckpointError(f"{f}: not a state dict (expected a mapping of names to tensors)")
            names = list(sd)
            if index is not None:
                mapped = {n for n, shard in index[1].items() if index[0].parent / shard == f}
                absent = sorted(mapped - sd.keys())
                if absent:
                    raise CheckpointError(
                        f"{index[0]}: tensor {absent[0]!r} mapped to {f.name!r}, which does not contain it"
                    )
                names = [n for n in sd if n in mapped]
            for name in names:
                t = sd[name]
                if name in self._infos:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self._infos[name].file} and {f}"
                    )
                self._infos[name] = TensorInfo(
                    name, f, tuple(t.shape), t.dtype, t.numel() * t.element_size(), 0
                )
            self._bin[f] = sd

    # -- queries ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names in reading order: shard by shard, by offset within a shard."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def file_of(self, name: str) -> Path:
        return self.info(name).file

    def files(self) -> list[Path]:
        """The weight files tensors are read from, in reading order."""
        return list(dict.fromkeys(i.file for i in self._infos.values())) or [
            *self._shards, *self._bin
        ]

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def get(self, name: str, pin_memory: bool = False) -> torch.Tensor:
        """Load one tensor into a new CPU tensor of its own. Thread-safe.

        pin_memory: read straight into page-locked memory, for an asynchronous copy to a GPU.
        """
        if self._closed:
            raise ValueError(f"checkpoint {self.path} is closed")
        info = self.info(name)
        bin_sd = self._bin.get(info.file)
        if bin_sd is not None:
            return bin_sd[name].pin_memory() if pin_memory else bin_sd[name]
        try:
            return self._shards[info.file].read(info, pin_memory)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from e

    def config(self) -> dict[str, Any] | None:
        """The model's config.json, or None when the checkpoint has none."""
        if self._folder is None:
            return None
        cfg = self._folder / "config.json"
        if not cfg.is_file():
            return None
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except OSError as e:
            raise CheckpointError(f"{cfg}: cannot read: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg}: expected a JSON object")
        return data

    def files_to_copy(self) -> list[Path]:
        """Tokenizer and other small non-weight files to carry into a merged output."""
        if self._folder is None:
            return []
        return sorted(f for f in self._folder.iterdir() if f.is_file() and _is_copy_file(f.name))

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()
        self._bin.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._infos)} tensors)"
