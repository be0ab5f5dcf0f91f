"""The streaming merge engine: plan the tensors, then stream them read -> device -> method -> write.

Inputs are opened lazily and validated before any work starts. Tensors then
flow one name at a time: a background thread reads (and checks) the next ones
under a byte budget while the current one is merged, and another thread writes
finished tensors into the output shards. Peak memory is therefore a small
multiple of the largest tensor times the number of models, whatever the model
size. Model-scope methods stream every merged tensor through their statistics
passes first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from pymerge import __version__, backends, hostmem
from pymerge.config import MergeConfig, layer_index, load_config
from pymerge.errors import InputMismatchError, MergeError
from pymerge.align.apply import load_permutation_file, permute_tensor, tensor_maps
from pymerge.distributed import Group, join
from pymerge.io import CheckpointReader, CheckpointWriter
from pymerge.io.slices import SlicedModel
from pymerge.methods import get_method
from pymerge.staging import HostStaging, staging_for

log = logging.getLogger("pymerge.engine")

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class MergeReport:
    """What a merge did: sizes, time, memory and the backends that ran."""

    out_dir: Path
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    device: str
    backends: dict[str, int] = field(default_factory=dict)
    resumed_tensors: int = 0
    rank: int = 0
    world_size: int = 1

    def __str__(self) -> str:
        used = ", ".join(f"{b} ({n} ops)" for b, n in sorted(self.backends.items())) or "none"
        gbs = self.bytes_read / max(self.seconds, 1e-9) / 1e9
        who = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        return (
            f"{who}merged {self.tensors} tensors with {self.method} in {self.seconds:.2f} s "
            f"({self.bytes_read / 1e6:.1f} MB read, {gbs:.2f} GB/s; {self.bytes_written / 1e6:.1f} MB written) "
            f"on {self.device}; backends: {used}; peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB -> {self.out_dir}"
        )


@dataclass
class _Plan:
    ref: CheckpointReader  # the model whose names, order and metadata the output follows
    merged: dict[str, tuple[int, ...]]
    copied: list[str]
    task_specific: list[str]
    order: list[str]
    num_layers: int


def merge(config: MergeConfig | dict | str | Path, out_dir: str | Path, *, overwrite: bool = False,
          quiet: bool = True, prefetch_bytes: int | None = None, distributed: bool = False,
          **options: Any) -> MergeReport:
    """Merge the models a config names into `out_dir`.

    `config` is a MergeConfig, a dict or the path of a (mergekit-style) YAML file.
    `options` override the config's own keys: device, backend, out_shard_size,
    allow_nonfinite, seed, out_dtype. `prefetch_bytes` bounds the bytes read ahead.
    `distributed=True` runs this call on every rank of a torchrun job, each rank merging
    and writing its share of the output shards (see pymerge.distributed); the result is
    the single-process one, bit for bit. The report is this rank's.
    """
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if options:
        cfg = cfg.with_overrides(**options)
    group = join(cfg.device) if distributed else Group()
    return _Merge(cfg, Path(out_dir), overwrite=overwrite, quiet=quiet, prefetch_bytes=prefetch_bytes, group=group).run()


# Shards per rank a distributed run aims for, so the byte balance is even.
_SHARDS_PER_RANK = 4


class _Merge:
    def __init__(self, cfg: MergeConfig, out_dir: Path, *, overwrite: bool, quiet: bool, prefetch_bytes: int | None,
                 group: Group | None = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.overwrite = overwrite
        self.group = group or Group()
        self.quiet = quiet or self.group.rank != 0
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError(f"device {cfg.device!r}: CUDA is not available here")
        if self.group.distributed:
            self._share_machine()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.staging = staging_for(self.device)
        self.host_staging = HostStaging(torch.device("cpu"))
        self.method_cls = get_method(cfg.merge_method)
        self.prefetch_bytes = prefetch_bytes
        self.bytes_read = 0
        self.backend_counts: Counter[str] = Counter()
        self.base: CheckpointReader | None = None
        self.models: list[CheckpointReader] = []

    # --- set-up ---------------------------------------------------------------------------
    def _share_machine(self) -> None:
        """One GPU per rank; CPU ranks on one host split its cores between them."""
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.group.local_rank)
            return
        threads = max(1, (os.cpu_count() or 1) // self.group.local_world_size)
        torch.set_num_threads(threads)
        if backends.implements("cpu", "weighted_sum"):
            from pymerge.backends import cpu

            cpu.set_num_threads(threads)

    def _open(self) -> None:
        uses_base = self.method_cls.needs_base
        if uses_base and not self.cfg.base_model:
            raise MergeError(f"merge_method {self.cfg.merge_method} needs a base_model")
        self.base = CheckpointReader(self.cfg.base_model) if uses_base else None
        if self.cfg.slices:
            self.models.append(SlicedModel(self.cfg.slices))  # read as one composed model
            self.labels = [f"slices ({', '.join(sorted({s.model for s in self.cfg.slices}))})"]
            self.permutations, self.src_heads = [None], [None]
            return
        for m in self.cfg.models:
            self.models.append(CheckpointReader(m.model))  # one by one: _close closes those opened
        self.labels = [m.model for m in self.cfg.models]
        self.permutations = [_load_permutations(m.permutations) if m.permutations else None for m in self.cfg.models]
        self.src_heads = [_source_heads(m.permutations, pf, r) for m, pf, r in zip(self.cfg.models, self.permutations, self.models)]

    def _close(self) -> None:
        for r in [self.base, *self.models]:
            if r is not None:
                r.close()
        hostmem.release()  # the pooled output buffers no tensor holds any more

    def _make_plan(self) -> _Plan:
        ref = self.base or self.models[0]
        readers = ([self.base] if self.base else []) + self.models
        labels = (["base_model " + self.cfg.base_model] if self.base else []) + self.labels
        problems: list[str] = []
        merged: dict[str, tuple[int, ...]] = {}
        copied: list[str] = []
        task_specific: list[str] = []
        for name in ref.names():
            absent = [lab for r, lab in zip(readers, labels) if name not in r]
            if absent:
                problems.append(f"{name}: missing from {', '.join(absent)}")
                continue
            if not ref.dtype(name).is_floating_point:
                copied.append(name)
                continue
            not_float = [lab for r, lab in zip(readers, labels) if not r.dtype(name).is_floating_point]
            if not_float:
                problems.append(f"{name}: not a float tensor in {', '.join(not_float)}")
                continue
            shapes = [tuple(r.shape(name)) for r in readers]
            if len(set(shapes)) > 1 and self.permutations and any(self.permutations):
                shapes = self._mapped_shapes(name, shapes)
            if len(set(shapes)) > 1:
                if self.method_cls.keeps_task_specific:
                    task_specific.append(name)
                else:
                    problems.append(f"{name}: shapes differ: " + ", ".join(f"{s} in {lab}" for s, lab in zip(shapes, labels)))
                continue
            merged[name] = shapes[0]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise InputMismatchError(f"the input models do not match ({len(problems)} problems):\n  {shown}{more}")
        extra = sorted({n for r in readers for n in r.names()} - set(ref.names()))
        if extra:
            log.warning("ignoring %d tensors absent from %s: %s", len(extra), ref.path, ", ".join(extra[:5]))
        layers = [layer_index(n) for n in ref.names()]
        num_layers = 1 + max((i for i in layers if i is not None), default=-1)
        return _Plan(ref, merged, copied, task_specific, ref.names(), num_layers)

    def _out_dtype(self, name: str) -> torch.dtype:
        return self.cfg.out_dtype or self.plan.ref.dtype(name)

    def _output_plan(self) -> dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]:
        """Input name -> the output tensors written for it, in the output's order."""
        out = {}
        prefix = self.method_cls.copy_prefix
        for name in self.plan.order:
            if name in self.plan.merged:
                out[name] = self.method.output_plan(name, self.plan.merged[name])
            elif name in self.plan.task_specific:
                out[name] = [(f"task{i}:{name}", tuple(r.shape(name)), r.dtype(name)) for i, r in enumerate(self.models)]
            else:
                out[name] = [(prefix + name, tuple(self.plan.ref.shape(name)), self.plan.ref.dtype(name))]
        return out

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"pymerge {__version__}\n".encode())
        h.update(json.dumps(self.cfg.to_dict(), sort_keys=True, default=str).encode())
        files = [f for r in ([self.base] if self.base else []) + self.models for f in sorted(r.files())]
        files += [m.permutations for m in self.cfg.models if m.permutations]
        for f in files:
            st = Path(f).stat()
            h.update(f"{Path(f).resolve()} {st.st_size} {st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    # --- streaming ------------------------------------------------------------------------
    def _load_merged(self, name: str):
        """(base, tensors, maps): maps is None, or per model one index map (or None) per axis.

        A method that fuses permutations (linear) gets the tensors as stored and the maps, and
        averages in one permute_average; for the others each tensor is re-indexed as it is read.
        Either way a permuted copy of a model never exists.
        """
        base = self._read(self.base, name, "base_model") if self.base is not None else None
        tensors = [self._read(r, name, lab) for r, lab in zip(self.models, self.labels)]
        if not any(self.permutations):
            return base, tensors, None
        maps = [self._maps(i, name, t.dim()) for i, t in enumerate(tensors)]
        if self.method_cls.fuses_permutations:
            return base, tensors, maps
        return base, [permute_tensor(t, m).contiguous() for t, m in zip(tensors, maps)], None

    def _maps(self, model: int, name: str, ndim: int) -> list[torch.Tensor | None]:
        pf = self.permutations[model]
        if pf is None:
            return [None] * ndim
        return tensor_maps(pf.spec, pf.perms, name, ndim, src_heads=self.src_heads[model])

    def _mapped_shapes(self, name: str, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shapes after the permutation files' maps: partial maps bring other widths to the base's."""
        offset = len(shapes) - len(self.models)
        out = list(shapes)
        for i, pf in enumerate(self.permutations):
            if pf is not None:
                maps = self._maps(i, name, len(shapes[offset + i]))
                out[offset + i] = tuple(s if m is None else int(m.shape[0]) for s, m in zip(shapes[offset + i], maps))
        if len(set(out)) == 1 and len(set(shapes)) > 1 and not self.method_cls.fuses_permutations:
            raise MergeError(
                f"{name}: models of different widths merge with merge_method: linear only (a partial map leaves "
                f"units without a donor, which {self.cfg.merge_method} would read as zeros)"
            )
        return out

    def _read(self, reader: CheckpointReader, name: str, label: str, compute: bool = True) -> torch.Tensor:
        """One input tensor, checked for NaN/Inf, on the device (compute) or on the host (copied as is)."""
        what = f"{name} in {label} holds NaN or Inf values; pass --allow-nonfinite (allow_nonfinite=True) to merge anyway"
        staging = self.staging if compute else self.host_staging
        return staging.read(lambda **kw: reader.get(name, **kw), not self.cfg.allow_nonfinite, what)

    def _input_bytes(self, name: str) -> int:
        readers = ([self.base] if self.base is not None and name in self.plan.merged else [])
        readers += self.models if name not in self.plan.copied else [self.plan.ref]
        return sum(r.nbytes(name) for r in readers)

    def _stream(self, names: list[str], load: Callable[[str], Any], desc: str) -> Iterator[tuple[str, Any]]:
        total = sum(self._input_bytes(n) for n in names)
        budget = self.prefetch_bytes
        if budget is None:
            budget = max(256 * 2**20, 2 * max((self._input_bytes(n) for n in names), default=0))

        def staged(name):
            with self.staging.uploading():
                item = load(name)
            return item, self.staging.uploaded()

        with _progress(total, desc, self.quiet) as bar:
            for name, (item, token) in _prefetch(names, staged, self._input_bytes, budget):
                self.staging.ready(token, item)
                yield name, item
                self.bytes_read += self._input_bytes(name)
                bar.update(self._input_bytes(name))
        self.staging.finish()

    def _call(self, fn: Callable, *args):
        result = fn(*args)
        used = backends.last_backend()
        if used:
            self.backend_counts[used] += 1
        return result

    def run(self) -> MergeReport:
        start = time.perf_counter()
        self.writer = None
        try:
            self._step("planning", self._prepare)
            for p in range(self.method.passes):
                self._step(f"statistics pass {p + 1}", lambda: self._statistics_pass(p))
                if self.group.distributed:
                    self.method.reduce_statistics(p, self.group.reduce)
                self._step(f"statistics pass {p + 1}", lambda: self.method.end_pass(p))
            written = self._step("the merge pass", self._merge_pass)
            if self.group.distributed:
                self.method.reduce_merge_statistics(self.group.reduce, self.stat_names)
            self._step("finalizing", self._finalize)
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            raise
        finally:
            self._close()
        mine = [o for o in self.outputs if self.writer.owner_of(o[0]) == self.group.rank]
        return MergeReport(
            out_dir=self.out_dir,
            method=self.cfg.merge_method,
            tensors=len(mine),
            bytes_read=self.bytes_read,
            bytes_written=sum(_nbytes(s, d) for n, s, d in mine),
            seconds=time.perf_counter() - start,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            device=str(self.device),
            backends=dict(self.backend_counts),
            resumed_tensors=len(mine) - written,
            rank=self.group.rank,
            world_size=self.group.world_size,
        )

    def _step(self, step: str, fn: Callable[[], Any]) -> Any:
        """Run one step; then every rank learns whether any rank failed in it (and stops if so)."""
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        self.group.check(error, step)
        return result

    def _prepare(self) -> None:
        self._open()
        self.plan = self._make_plan()
        self.method = self.method_cls(
            self.cfg,
            self.plan.merged,
            lambda n: self.cfg.tensor_params(n, self.plan.num_layers),
            self._out_dtype,
        )
        self.method.inputs_planned(self.plan.order, self.plan.copied, self.plan.task_specific)
        self.outputs_of = self._output_plan()
        self.outputs = [o for outs in self.outputs_of.values() for o in outs]
        self.writer = CheckpointWriter(
            self.out_dir,
            self.outputs,
            max_shard_bytes=self._shard_bytes(),
            fingerprint=self._fingerprint(),
            overwrite=self.overwrite,
            rank=self.group.rank,
            world_size=self.group.world_size,
        )
        # Each merged tensor's statistics come from the rank that writes its first output.
        first = {name: outs[0][0] for name, outs in self.outputs_of.items()}
        self.stat_names = [n for n in self.plan.merged if self.writer.owner_of(first[n]) == self.group.rank]

    def _shard_bytes(self) -> int:
        """The configured shard size; smaller in a distributed run, so every rank gets a few shards."""
        limit = self.cfg.out_shard_size
        if self.group.distributed:
            total = sum(_nbytes(s, d) for _, s, d in self.outputs)
            limit = min(limit, max(1, -(-total // (_SHARDS_PER_RANK * self.group.world_size))))
        return limit

    def _statistics_pass(self, p: int) -> None:
        desc = f"statistics {p + 1}/{self.method.passes}"
        for name, (base, tensors, _) in self._stream(self.stat_names, self._load_merged, desc):
            self._call(self.method.observe, p, name, base, tensors)

    def _finalize(self) -> None:
        if self.group.rank != 0:
            return
        cfg_json = _updated_config(self.plan.ref.config(), self.cfg.out_dtype)
        self.writer.finalize(cfg_json, self._tokenizer_files(), self.method.extra_files())

    def _merge_pass(self) -> int:
        """Stream every tensor name this rank writes through the method (or copy it) into the writer."""
        outs_of = {name: [o[0] for o in outs] for name, outs in self.outputs_of.items()}
        pending = set(self.writer.pending_names())
        # A method that accumulates statistics in `merge` sees every tensor it owns, even
        # those a resumed run does not write again.
        sees_all = set(self.stat_names) if self.method.merge_sees_all else set()
        todo = [n for n in self.plan.order if n in sees_all or any(o in pending for o in outs_of[n])]

        def load(name):
            if name in self.plan.merged:
                return self._load_merged(name)
            if name in self.plan.task_specific:
                return [self._read(r, name, lab, compute=False) for r, lab in zip(self.models, self.labels)]
            return self._read(self.plan.ref, name, str(self.plan.ref.path), compute=False)

        written = 0
        with _BackgroundWriter(self.writer, self.staging) as sink:
            for name, item in self._stream(todo, load, "merge"):
                if name in self.plan.merged:
                    base, tensors, maps = item
                    if maps is None:
                        results = self._call(self.method.merge, name, base, tensors)
                    else:
                        results = self._call(self.method.merge_aligned, name, base, tensors, maps)
                elif name in self.plan.task_specific:
                    results = {f"task{i}:{name}": t for i, t in enumerate(item)}
                else:
                    results = {self.method_cls.copy_prefix + name: item}
                for out_name in outs_of[name]:
                    if out_name in pending:
                        sink.put(out_name, results[out_name])
                        written += 1
        self.writer.finish_shards()
        return written

    def _tokenizer_files(self) -> list[Path]:
        src = self.cfg.tokenizer_source
        if src in (None, "base"):
            reader = self.plan.ref
        else:
            reader = next((r for r in [self.base, *self.models] if r is not None and str(r.path) == str(Path(src))), None)
            if reader is None:
                with CheckpointReader(src) as r:
                    return r.files_to_copy()
        return reader.files_to_copy()


def _load_permutations(path: str):
    try:
        pf = load_permutation_file(path)
    except Exception as exc:  # safetensors raises its own error type for a corrupt file
        raise MergeError(f"permutations {path}: {exc}") from exc
    if pf.spec is None:
        raise MergeError(f"permutations {path}: the file holds no permutation spec; write it with `pymerge align`")
    return pf


def _source_heads(path: str, pf, reader: CheckpointReader):
    """The model's own head counts: a model with other widths maps onto the base's heads."""
    if pf is None or not pf.spec.heads:
        return None
    from pymerge.align.widths import infer_heads

    try:
        return infer_heads(pf.spec, {n: reader.shape(n) for n in reader.names()})
    except ValueError as exc:
        raise MergeError(f"permutations {path} do not fit {reader.path}: {exc}") from exc


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _updated_config(config: dict | None, out_dtype: torch.dtype | None) -> dict | None:
    if config is None or out_dtype is None:
        return config
    config = dict(config)
    name = DTYPE_NAMES[out_dtype]
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    return config


class _progress:
    """A tqdm bar over bytes, or nothing when quiet."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


_DONE = object()


def _prefetch(names: Iterable[str], load: Callable[[str], Any], size: Callable[[str], int], budget: int):
    """Yield (name, load(name)) in order; a background thread loads ahead within `budget` bytes."""
    q: queue.Queue = queue.Queue()
    cond = threading.Condition()
    state = {"inflight": 0, "stop": False}

    def worker():
        try:
            for name in names:
                nbytes = size(name)
                with cond:
                    cond.wait_for(lambda: state["stop"] or state["inflight"] == 0 or state["inflight"] + nbytes <= budget)
                    if state["stop"]:
                        return
                    state["inflight"] += nbytes
                q.put((name, load(name), nbytes))
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)
            return
        q.put(_DONE)

    thread = threading.Thread(target=worker, name="pymerge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            name, item, nbytes = got
            yield name, item
            del item
            with cond:
                state["inflight"] -= nbytes
                cond.notify()
    finally:
        with cond:
            state["stop"] = True
            cond.notify()
        thread.join()


class _BackgroundWriter:
    """Hands finished tensors to the checkpoint writer on its own thread (after their download)."""

    def __init__(self, writer: CheckpointWriter, staging: HostStaging, depth: int = 2):
        self.writer = writer
        self.staging = staging
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pymerge-writer", daemon=True)

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                name, host, token = item
                try:
                    self.staging.downloaded(token)
                    self.writer.add(name, host)
                except BaseException as exc:
                    self.error = exc

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, *self.staging.download(tensor)))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.q.put(None)
        self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error
