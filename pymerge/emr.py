"""Reading an EMR-Merging folder: the tensors of any task, in memory or as a checkpoint.

`pymerge merge` with `merge_method: emr` writes theta_0, the unified task vector
u, one bit-plane mask per task and the rescalers (see pymerge/methods/emr.py).
Task i is theta_0 + lambda_i * M_i * u, rebuilt in one fused pass per tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pymerge import ops
from pymerge.errors import CheckpointError
from pymerge.io import CheckpointReader, CheckpointWriter
from pymerge.methods.emr import EMR_FORMAT, EMR_VERSION


class EmrModel:
    """A lazily loaded EMR folder. Tensors are read on demand; nothing is held."""

    def __init__(self, path: str | Path, *, backend: str = "auto"):
        self.path = Path(path)
        meta_file = self.path / "emr.json"
        if not meta_file.is_file():
            raise CheckpointError(f"{self.path} is not an EMR folder: emr.json is missing")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_file}: invalid JSON ({exc})") from None
        if self.meta.get("format") != EMR_FORMAT or self.meta.get("version") != EMR_VERSION:
            raise CheckpointError(f"{meta_file}: not a {EMR_FORMAT} v{EMR_VERSION} file")
        self.reader = CheckpointReader(self.path)
        self.lambdas: list[float] = self.meta["lambdas"]
        self.tasks: list[str] = self.meta["tasks"]
        self.backend = backend
        self._merged = set(self.meta["merged"])
        self._task_specific = set(self.meta["task_specific"])

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def names(self) -> list[str]:
        """The tensor names of a reconstructed model, in checkpoint order."""
        return list(self.meta["order"])

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range: this EMR folder holds {self.num_tasks} tasks")

    def tensor(self, name: str, task: int, *, device: str | torch.device = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
        """Task `task`'s value of tensor `name`; written into `out` when given."""
        self._check_task(task)
        if name in self._merged:
            base = self.reader.get(f"base:{name}").to(device)
            u = self.reader.get(f"u:{name}").to(device)
            words = self.reader.get(f"masks:{name}")[task].to(device)
            value = ops.emr_reconstruct(
                base, u, words, self.lambdas[task],
                out_dtype=out.dtype if out is not None else None, backend=self.backend,
            )
        elif name in self._task_specific:
            value = self.reader.get(f"task{task}:{name}").to(device)
        else:
            value = self.reader.get(f"base:{name}").to(device)
        if out is None:
            return value
        if out.shape != value.shape:
            raise ValueError(f"{name}: target shape {tuple(out.shape)} != {tuple(value.shape)}")
        return out.copy_(value)

    def state_dict(self, task: int, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """All tensors of task `task`."""
        return {n: self.tensor(n, task, device=device) for n in self.names()}

    def switch_task(self, tensors: dict[str, torch.Tensor], task: int) -> None:
        """Turn a loaded model's tensors (a state dict, or `model.state_dict()`) into task `task`'s, in place.

        Each tensor is rebuilt from theta_0, u and the task's bit-plane rather than
        by adding a difference, so switching back and forth never drifts.
        """
        self._check_task(task)
        with torch.no_grad():
            for name in self.names():
                if name in tensors:
                    target = tensors[name]
                    self.tensor(name, task, device=target.device, out=target)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str | Path, *, backend: str = "auto") -> EmrModel:
    """Open an EMR folder written by `pymerge merge` with `merge_method: emr`."""
    return EmrModel(path, backend=backend)


def reconstruct(path: str | Path, task: int, dest: str | Path, *, max_shard_bytes: int = 5 * 10**9,
                overwrite: bool = False) -> Path:
    """Write task `task`'s checkpoint into `dest` (sharded safetensors, config and tokenizer files)."""
    with load(path) as emr:
        emr._check_task(task)
        plan = []
        for name in emr.names():
            if name in emr._merged:
                src = f"base:{name}"
            elif name in emr._task_specific:
                src = f"task{task}:{name}"
            else:
                src = f"base:{name}"
            plan.append((name, tuple(emr.reader.shape(src)), emr.reader.dtype(src)))
        fingerprint = f"emr {Path(path).resolve()} task {task} {(Path(path) / 'emr.json').stat().st_mtime_ns}"
        writer = CheckpointWriter(dest, plan, max_shard_bytes=max_shard_bytes, fingerprint=fingerprint, overwrite=overwrite)
        try:
            done = writer.completed_names()
            for name, _, _ in plan:
                if name not in done:
                    writer.add(name, emr.tensor(name, task))
            files = [f for f in emr.reader.files_to_copy() if f.name != "emr.json"]
            writer.finalize(emr.reader.config(), files)
        except BaseException:
            writer.abort()
            raise
    return Path(dest)
