"""Moving tensors between host and device for the engine: no-ops on the CPU, a copy pipeline on a GPU.

On a GPU the engine's three threads each own one stage, so reading, copying, computing and
writing overlap:

    prefetch thread: disk -> pinned host tensor -> device, on the upload stream (+ NaN/Inf check)
    main thread:     waits for the upload's event on the compute stream, runs the method
    main thread:     device -> pinned host, on the download stream, after the compute's event
    writer thread:   waits for the download's event, writes the bytes

Pinned blocks come from torch's caching host allocator, which does not hand a block out again
until the copies recorded on it are done, so freeing a staging tensor early is safe. Device
tensors used on a stream other than the one that allocated them are recorded on it
(`record_stream`) for the same reason. The in-flight bytes are bounded by the engine's
prefetch budget and writer queue depth: this double-buffers without a fixed buffer pool.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from pymerge.errors import NonFiniteError


def tensors_in(item: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts."""
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, (tuple, list)):
        for x in item:
            yield from tensors_in(x)
    elif isinstance(item, dict):
        for x in item.values():
            yield from tensors_in(x)


class HostStaging:
    """The CPU engine's staging: tensors stay where they are read; checks run at once."""

    def __init__(self, device: torch.device):
        self.device = device

    def uploading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def read(self, get: Callable[..., torch.Tensor], check: bool, what: str) -> torch.Tensor:
        t = get().contiguous()
        if check and t.is_floating_point() and t.numel() and not _all_finite(t):
            raise NonFiniteError(what)
        return t

    def uploaded(self) -> Any:
        return None

    def ready(self, token: Any, item: Any) -> None:
        pass

    def download(self, t: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return t.detach().to("cpu"), None

    def downloaded(self, token: Any) -> None:
        pass

    def finish(self) -> None:
        pass


class CudaStaging(HostStaging):
    """Pinned staging and two copy streams around the compute stream of one GPU."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.upload_stream = torch.cuda.Stream(device)
        self.download_stream = torch.cuda.Stream(device)
        # (finite flag on the device, message) of the item being uploaded, and of the one before
        self._current: list[tuple[torch.Tensor, str]] = []
        self._previous: list[tuple[torch.Tensor, str]] = []

    def uploading(self) -> contextlib.AbstractContextManager:
        """Run the prefetch thread's loads inside this: their copies go on the upload stream."""
        return torch.cuda.stream(self.upload_stream)

    def read(self, get: Callable[..., torch.Tensor], check: bool, what: str) -> torch.Tensor:
        host = get(pin_memory=True)
        dev = host.to(self.device, non_blocking=True)
        if check and dev.is_floating_point() and dev.numel():
            self._current.append((torch.isfinite(dev).all(), what))
        return dev

    def uploaded(self) -> torch.cuda.Event:
        """After one item's loads: an event the compute stream waits for. Checks the previous
        item's NaN/Inf flags, whose kernels have long finished, so the check never stalls a copy."""
        event = torch.cuda.Event()
        event.record(self.upload_stream)
        previous, self._previous, self._current = self._previous, self._current, []
        self._check(previous)
        return event

    @staticmethod
    def _check(flags: list[tuple[torch.Tensor, str]]) -> None:
        for flag, what in flags:
            if not bool(flag):
                raise NonFiniteError(what)

    def ready(self, token: torch.cuda.Event, item: Any) -> None:
        """Main thread, before computing on an item: wait for its upload, and keep its memory
        from being reused by the upload stream while the compute stream still reads it."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(token)
        for t in tensors_in(item):
            if t.is_cuda:
                t.record_stream(compute)

    def download(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Main thread: start copying a result to pinned host memory once the compute is done."""
        if not t.is_cuda:
            return t.detach(), None
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.download_stream):
            self.download_stream.wait_event(computed)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            t.record_stream(self.download_stream)
            done = torch.cuda.Event()
            done.record(self.download_stream)
        return host, done

    def downloaded(self, token: torch.cuda.Event | None) -> None:
        """Writer thread: wait until the host copy holds the result."""
        if token is not None:
            token.synchronize()

    def finish(self) -> None:
        """End of a pass: every remaining flag is checked."""
        pending, self._previous, self._current = self._previous + self._current, [], []
        self._check(pending)


def _all_finite(t: torch.Tensor) -> bool:
    """The compiled check where it applies (a single pass, no bool temporary), else torch's."""
    from pymerge import backends

    if t.dtype in (torch.float32, torch.float16, torch.bfloat16) and backends.implements("cpu", "all_finite"):
        from pymerge.backends.cpu import all_finite

        return all_finite(t)
    return bool(torch.isfinite(t).all())


def staging_for(device: torch.device) -> HostStaging:
    return CudaStaging(device) if device.type == "cuda" else HostStaging(device)
