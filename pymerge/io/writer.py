"""Checkpoint writer: sharded safetensors, streamed tensor by tensor, atomic and resumable.

Every output shape and dtype is known before merging, so each shard's header is written
first and tensor bytes follow in plan order: memory stays at one tensor, never a shard.
Everything is staged under ``<out_dir>/.pymerge-partial/`` and moved into ``out_dir`` only by
``finalize``, so an interrupted run never leaves a finished-looking checkpoint behind. A
manifest there records each completed shard's size and sha256 so that a rerun with the same
fingerprint and plan skips them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence

import torch

from pymerge.distributed import assign_shards
from pymerge.errors import CheckpointError, OutputError
from pymerge.io.reader import (
    BIN_INDEX,
    SAFETENSORS_DTYPES,
    SAFETENSORS_INDEX,
    TORCH_TO_SAFETENSORS,
    _is_copy_file,
)

__all__ = ["CheckpointWriter", "PARTIAL_DIR", "PROGRESS_FILE", "plan_hash", "shard_plan"]

PARTIAL_DIR = ".pymerge-partial"
PROGRESS_FILE = "progress.json"
_PARTIAL_SUFFIX = ".partial"
_MANIFEST_VERSION = 1
_HASH_CHUNK = 8 << 20

PlanEntry = tuple[str, Sequence[int], "torch.dtype | str"]


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    st_dtype: str
    nbytes: int


@dataclass
class _Shard:
    filename: str
    entries: list[int] = field(default_factory=list)  # indices into the plan
    data_bytes: int = 0

    def header(self, plan: list[_Entry]) -> bytes:
        hdr: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self.entries:
            e = plan[i]
            hdr[e.name] = {"dtype": e.st_dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
        # The safetensors library pads the header with spaces to keep tensor data 8-byte aligned.
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw


def _normalize_plan(plan: Iterable[PlanEntry]) -> list[_Entry]:
    out: list[_Entry] = []
    seen: set[str] = set()
    for item in plan:
        try:
            name, shape, dtype = item
        except (TypeError, ValueError):
            raise ValueError(f"plan entries must be (name, shape, dtype), got {item!r}") from None
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name in plan: {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the plan")
        seen.add(name)
        if isinstance(dtype, str):
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}")
            dtype = SAFETENSORS_DTYPES[dtype]
        if dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        try:
            shape_t = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: invalid shape {shape!r}") from None
        if any(d < 0 for d in shape_t):
            raise ValueError(f"tensor {name!r}: invalid shape {shape_t}")
        nbytes = math.prod(shape_t) * dtype.itemsize
        out.append(_Entry(name, shape_t, dtype, TORCH_TO_SAFETENSORS[dtype], nbytes))
    return out


def shard_plan(sizes: Sequence[int], max_shard_bytes: int) -> list[list[int]]:
    """Group tensor indices into shards in order: start a new shard when adding a tensor
    would exceed the limit and the current shard is not empty."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def plan_hash(plan: Iterable[PlanEntry], max_shard_bytes: int) -> str:
    """Stable hash of the output layout: a resume is only valid for the same layout."""
    entries = _normalize_plan(plan)
    return _plan_hash(entries, max_shard_bytes)


def _plan_hash(entries: list[_Entry], max_shard_bytes: int) -> str:
    desc = {
        "version": _MANIFEST_VERSION,
        "max_shard_bytes": max_shard_bytes,
        "tensors": [[e.name, list(e.shape), e.st_dtype] for e in entries],
    }
    return hashlib.sha256(json.dumps(desc, separators=(",", ":")).encode("utf-8")).hexdigest()


def _open_shard_file(path: Path) -> BinaryIO:
    """Open a shard for streaming writes (a seam for tests that simulate a full disk)."""
    return open(path, "wb")


def _fsync_dir(path: Path) -> None:
    # Makes renames durable on POSIX; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _finished_checkpoint_files(folder: Path) -> list[Path]:
    """Top-level files that make a folder look like a finished checkpoint."""
    if not folder.is_dir():
        return []
    found = []
    for f in folder.iterdir():
        n = f.name
        if not f.is_file():
            continue
        if (
            n in ("config.json", SAFETENSORS_INDEX, BIN_INDEX)
            or n.endswith(".safetensors")
            or (n.startswith("pytorch_model") and n.endswith(".bin"))
        ):
            found.append(f)
    return sorted(found)


class CheckpointWriter:
    """Write a merged checkpoint as sharded safetensors, one tensor at a time.

    ``plan`` lists every output tensor as ``(name, shape, dtype)`` in write order. Call
    ``add`` for each name not in ``completed_names()`` in plan order, then ``finalize``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Iterable[PlanEntry],
        *,
        max_shard_bytes: int = 5 * 10**9,
        fingerprint: str,
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
        if not isinstance(fingerprint, str):
            raise ValueError("fingerprint must be a string")
        self.out_dir = Path(out_dir)
        self.partial_dir = self.out_dir / PARTIAL_DIR
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self._plan = _normalize_plan(plan)
        self._plan_hash = _plan_hash(self._plan, max_shard_bytes)
        self._index = {e.name: i for i, e in enumerate(self._plan)}

        groups = shard_plan([e.nbytes for e in self._plan], max_shard_bytes)
        n = len(groups)
        self._shards: list[_Shard] = []
        self._shard_of: list[int] = [0] * len(self._plan)
        for s, idx in enumerate(groups):
            filename = "model.safetensors" if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
            shard = _Shard(filename, list(idx), sum(self._plan[i].nbytes for i in idx))
            self._shards.append(shard)
            for i in idx:
                self._shard_of[i] = s
        # Several processes may write one checkpoint: each writes the shards assigned to
        # its rank, and rank 0 finalizes once the others are done.
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self._owner = assign_shards([s.data_bytes for s in self._shards], world_size)
        self._progress_file = PROGRESS_FILE if world_size == 1 else f"progress-{rank}-of-{world_size}.json"

        self._done: dict[str, dict[str, Any]] = {}  # shard filename -> {"size", "sha256"}
        self._file: BinaryIO | None = None
        self._file_path: Path | None = None
        self._hasher: Any = None
        self._written = 0
        self._finished = False
        self._aborted = False
        # add() may run on a writer thread while abort() comes from the main one.
        self._lock = threading.RLock()

        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputError(f"output path exists and is not a folder: {self.out_dir}")
        self._refuse_existing_checkpoint()
        self._guard(lambda: self.out_dir.mkdir(parents=True, exist_ok=True), self.out_dir)
        self._load_progress()

        self._pending = [
            i for i, _ in enumerate(self._plan)
            if self._owns(self._shard_of[i]) and self._shards[self._shard_of[i]].filename not in self._done
        ]
        self._cursor = 0

    def _owns(self, shard: int) -> bool:
        return self._owner[shard] == self.rank

    # -- public API ------------------------------------------------------------------------

    @property
    def shard_files(self) -> list[tuple[str, list[str]]]:
        """(file name, tensor names) of each output shard, in order."""
        return [(s.filename, [self._plan[i].name for i in s.entries]) for s in self._shards]

    @property
    def total_size(self) -> int:
        """Sum of tensor bytes, as recorded in the index's metadata.total_size."""
        return sum(e.nbytes for e in self._plan)

    def owner_of(self, name: str) -> int:
        """The rank that writes output tensor `name` (always 0 in a single-process run)."""
        return self._owner[self._shard_of[self._index[name]]]

    def completed_names(self) -> set[str]:
        """Tensors already written and verified by an earlier run; skip them."""
        return {self._plan[i].name for s in self._shards if s.filename in self._done for i in s.entries}

    def pending_names(self) -> list[str]:
        """Tensors still to be added, in the order ``add`` expects them."""
        return [self._plan[i].name for i in self._pending[self._cursor :]]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (plan order, skipping completed names)."""
        with self._lock:
            self._add(name, tensor)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished or self._aborted:
            raise ValueError(f"writer for {self.out_dir} is already {'finalized' if self._finished else 'aborted'}")
        if self._cursor >= len(self._pending):
            raise ValueError(f"tensor {name!r} added after every planned tensor was written")
        idx = self._pending[self._cursor]
        entry = self._plan[idx]
        if name != entry.name:
            raise ValueError(f"tensors must be added in plan order: expected {entry.name!r}, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)} does not match the plan's {entry.shape}")
        if tensor.dtype != entry.dtype:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} does not match the plan's {entry.dtype}")

        shard = self._shards[self._shard_of[idx]]
        if self._file is None:
            self._begin_shard(shard)
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        # A byte view works for every dtype, bf16 and float8 included (numpy lacks those).
        buf = data.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write(memoryview(buf))
        self._cursor += 1
        if idx == shard.entries[-1]:
            self._finish_shard(shard)

    def finish_shards(self) -> None:
        """Complete this rank's shards. Every rank but 0 stops here; rank 0 goes on to finalize."""
        with self._lock:
            self._finish_shards()
            if self.rank != 0:
                self._finished = True

    def _finish_shards(self) -> None:
        if self._finished or self._aborted:
            raise ValueError(f"writer for {self.out_dir} is already {'finalized' if self._finished else 'aborted'}")
        if self._cursor < len(self._pending):
            missing = self._plan[self._pending[self._cursor]].name
            raise ValueError(f"finalize called before every tensor was added (next expected: {missing!r})")
        # Only an empty plan has a shard with no tensors; it never went through add().
        for s, shard in enumerate(self._shards):
            if self._owns(s) and shard.filename not in self._done:
                self._begin_shard(shard)
                self._finish_shard(shard)

    def finalize(
        self,
        config: dict[str, Any] | None,
        copy_files: Iterable[str | os.PathLike] = (),
        extra_files: dict[str, bytes] | None = None,
    ) -> None:
        """Write config, copied files and the index, then move everything into out_dir.

        With ``overwrite``, the replaced checkpoint's weights, index, config and tokenizer
        files that the new output does not carry are removed here; other files stay.
        """
        with self._lock:
            self._finalize(config, copy_files, extra_files)

    def _finalize(
        self,
        config: dict[str, Any] | None,
        copy_files: Iterable[str | os.PathLike],
        extra_files: dict[str, bytes] | None,
    ) -> None:
        if self.rank != 0:
            raise ValueError(f"rank {self.rank} does not finalize: call finish_shards(); rank 0 finalizes")
        self._finish_shards()
        for s, shard in enumerate(self._shards):
            if not self._owns(s):
                path = self.partial_dir / shard.filename
                expected = len(shard.header(self._plan)) + shard.data_bytes
                size = path.stat().st_size if path.is_file() else None
                if size != expected:
                    raise OutputError(
                        f"shard {shard.filename} of rank {self._owner[s]} is "
                        f"{'missing' if size is None else f'{size} bytes, not {expected}'} in {self.partial_dir}"
                    )

        staged: list[str] = []
        shard_names = [s.filename for s in self._shards]
        taken = set(shard_names) | {SAFETENSORS_INDEX}

        def stage(filename: str, data: bytes) -> None:
            if filename in taken or Path(filename).name != filename or filename in ("", ".", ".."):
                raise ValueError(f"cannot write output file {filename!r}: invalid or duplicate name")
            taken.add(filename)
            self._write_file(self.partial_dir / filename, data)
            staged.append(filename)

        if config is not None:
            stage("config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        for src in copy_files:
            src = Path(src)
            try:
                data = src.read_bytes()
            except OSError as e:
                raise CheckpointError(f"cannot read file to copy {src}: {e.strerror or e}") from e
            stage(src.name, data)
        for filename, data in (extra_files or {}).items():
            stage(filename, bytes(data))
        if len(self._shards) > 1:
            weight_map = {self._plan[i].name: s.filename for s in self._shards for i in s.entries}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            self._write_file(
                self.partial_dir / SAFETENSORS_INDEX,
                (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"),
            )
        self._refuse_existing_checkpoint()
        self._install(shard_names, staged)
        self._finished = True

    def abort(self) -> None:
        """Stop writing; completed shards stay under the partial folder for a resume."""
        with self._lock:
            if not self._finished:
                self._close_current(remove=True)
                self._aborted = True

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.abort()

    # -- internals -------------------------------------------------------------------------

    def _os_error(self, e: OSError, path: Path) -> OutputError:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return OutputError(
                f"disk full: no space left on device while writing {path} "
                f"(output folder {self.out_dir}); free some space or choose another output folder"
            )
        return OutputError(f"cannot write {path}: {e.strerror or e}")

    def _guard(self, fn: Any, path: Path) -> Any:
        try:
            return fn()
        except OSError as e:
            raise self._os_error(e, path) from e

    def _refuse_existing_checkpoint(self) -> None:
        if self.overwrite:
            return
        existing = _finished_checkpoint_files(self.out_dir)
        if existing:
            names = ", ".join(f.name for f in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise OutputError(
                f"output folder {self.out_dir} already holds a checkpoint ({names}); "
                "pass overwrite=True (--overwrite) to replace it"
            )

    def _load_progress(self) -> None:
        progress_path = self.partial_dir / self._progress_file
        keep: set[str] = {self._progress_file}
        if self.partial_dir.is_dir():
            try:
                progress = json.loads(progress_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                progress = None
            valid = (
                isinstance(progress, dict)
                and progress.get("version") == _MANIFEST_VERSION
                and progress.get("fingerprint") == self.fingerprint
                and progress.get("plan_hash") == self._plan_hash
                and isinstance(progress.get("shards"), dict)
            )
            if valid:
                for s, shard in enumerate(self._shards):
                    rec = progress["shards"].get(shard.filename)
                    if self._owns(s) and isinstance(rec, dict) and self._verify_shard(shard, rec):
                        self._done[shard.filename] = {"size": rec["size"], "sha256": rec["sha256"]}
                        keep.add(shard.filename)
            if self.world_size > 1:
                # The folder is shared: a rank clears only the files of its own shards.
                mine = {self._progress_file} | {
                    f for s, shard in enumerate(self._shards) if self._owns(s)
                    for f in (shard.filename, shard.filename + _PARTIAL_SUFFIX)
                }
                stale = [self.partial_dir / f for f in sorted(mine - keep)]
            elif valid:
                # Anything else (an interrupted .partial, a shard that failed verification,
                # files staged by an interrupted finalize) is rebuilt.
                stale = [f for f in self.partial_dir.iterdir() if f.name not in keep]
            else:
                stale = [self.partial_dir]
            for f in stale:
                if f.is_dir() and not f.is_symlink():
                    self._guard(lambda f=f: shutil.rmtree(f), f)
                elif f.exists() or f.is_symlink():
                    self._guard(f.unlink, f)
        self._guard(lambda: self.partial_dir.mkdir(exist_ok=True), self.partial_dir)
        self._save_progress()

    def _verify_shard(self, shard: _Shard, rec: dict[str, Any]) -> bool:
        path = self.partial_dir / shard.filename
        expected_size = len(shard.header(self._plan)) + shard.data_bytes
        try:
            if rec.get("size") != expected_size or path.stat().st_size != expected_size:
                return False
            return _sha256_file(path) == rec.get("sha256")
        except OSError:
            return False

    def _save_progress(self) -> None:
        manifest = {
            "version": _MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "plan_hash": self._plan_hash,
            "shards": self._done,
        }
        self._write_file(
            self.partial_dir / self._progress_file,
            (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"),
        )

    def _write_file(self, path: Path, data: bytes) -> None:
        """Write a small file durably: temporary name, fsync, rename."""
        tmp = path.with_name(path.name + ".tmp")

        def write() -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        try:
            write()
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise self._os_error(e, path) from e

    def _begin_shard(self, shard: _Shard) -> None:
        path = self.partial_dir / (shard.filename + _PARTIAL_SUFFIX)
        self._file_path = path
        self._file = self._guard(lambda: _open_shard_file(path), path)
        self._hasher = hashlib.sha256()
        self._written = 0
        self._write(memoryview(shard.header(self._plan)))

    def _write(self, data: memoryview) -> None:
        assert self._file is not None and self._file_path is not None
        try:
            self._file.write(data)
        except OSError as e:
            path = self._file_path
            self._close_current(remove=True)
            raise self._os_error(e, path) from e
        self._hasher.update(data)
        self._written += data.nbytes

    def _finish_shard(self, shard: _Shard) -> None:
        assert self._file is not None and self._file_path is not None
        f, tmp = self._file, self._file_path
        final = self.partial_dir / shard.filename
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._file = None
            os.replace(tmp, final)
        except OSError as e:
            self._close_current(remove=True)
            raise self._os_error(e, tmp) from e
        _fsync_dir(self.partial_dir)
        self._file_path = None
        self._done[shard.filename] = {"size": self._written, "sha256": self._hasher.hexdigest()}
        self._save_progress()

    def _close_current(self, remove: bool) -> None:
        f, path = self._file, self._file_path
        self._file = None
        self._file_path = None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        if remove and path is not None:
            try:
                path.unlink()
            except OSError:
                pass

    def _install(self, shard_names: list[str], staged: list[str]) -> None:
        """Move the staged checkpoint into out_dir, the index last, then drop stale files."""
        new_names = set(shard_names) | set(staged)
        multi = len(shard_names) > 1
        if multi:
            new_names.add(SAFETENSORS_INDEX)
        old = _finished_checkpoint_files(self.out_dir) if self.overwrite else []
        if self.overwrite:
            # Files of the replaced checkpoint that this output does not carry (tokenizer
            # files from a different base, for instance) would be stale.
            old += [f for f in self.out_dir.iterdir() if f.is_file() and _is_copy_file(f.name)]

        # An old index would point at a mix of old and new shards while they are moved.
        for name in (SAFETENSORS_INDEX, BIN_INDEX):
            p = self.out_dir / name
            if p.exists() and (self.overwrite or name not in new_names):
                self._guard(p.unlink, p)
        for name in [*shard_names, *staged]:
            src, dst = self.partial_dir / name, self.out_dir / name
            self._guard(lambda: os.replace(src, dst), dst)
        if multi:
            src, dst = self.partial_dir / SAFETENSORS_INDEX, self.out_dir / SAFETENSORS_INDEX
            self._guard(lambda: os.replace(src, dst), dst)
        _fsync_dir(self.out_dir)
        for f in old:
            if f.name not in new_names and f.exists():
                self._guard(f.unlink, f)
        self._guard(lambda: shutil.rmtree(self.partial_dir), self.partial_dir)
        _fsync_dir(self.out_dir)
