"""Large host tensors from a pool of reused, huge-page-backed buffers.

A fresh large allocation is a fresh mapping: every page costs a fault and a zeroing on
first touch, and for a kernel that streams its output once that costs as much as the
kernel (a 16M-element bf16 weighted sum: ~9 ms instead of ~3; in a VM first touches are
dearer still). glibc hands allocations of 32 MiB and more straight to mmap and returns
them on free, so it cannot keep them. This module keeps them instead: a large tensor is
a view of an anonymous mapping from a pool, advised as MADV_HUGEPAGE (Linux, with
transparent huge pages in "madvise" or "always" mode; purely advisory) so that even its
first touch costs one fault per 2 MiB instead of 512.

A buffer is back in the pool when no tensor uses it any more: a tensor made with
torch.frombuffer holds a reference to its mapping until its storage is freed, so a
mapping that only the pool references is free. Idle buffers are kept up to the most
bytes the pool has had in use at once (least recently used dropped first), and
`release()` drops them all; the engine calls it when a merge ends.
"""

from __future__ import annotations

import mmap
import sys
import threading

import torch

__all__ = ["empty", "release", "pool_stats"]

_HUGE = 1 << 21  # x86-64 and arm64 transparent huge page size
_MIN_BYTES = 1 << 20  # below this, torch's allocator reuses memory well enough
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_ANONYMOUS_MAPS = hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")  # POSIX; elsewhere no pool


def _capacity(nbytes: int) -> int:
    """Buffer size for a request: whole huge pages from 2 MiB, else whole 64 KiB."""
    unit = _HUGE if nbytes >= _HUGE else 1 << 16
    return -(-nbytes // unit) * unit


class _Buffer:
    """One anonymous mapping; `offset` puts its usable bytes on a huge-page boundary."""

    __slots__ = ("mm", "offset", "size")

    def __init__(self, size: int):
        huge = size >= 2 * _HUGE and _MADV_HUGEPAGE is not None
        self.mm = mmap.mmap(-1, size + (_HUGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.size = size
        self.offset = 0
        if huge:
            probe = torch.frombuffer(self.mm, dtype=torch.uint8, count=1)
            self.offset = -probe.data_ptr() % _HUGE
            del probe
            try:
                self.mm.madvise(_MADV_HUGEPAGE)
            except OSError:
                pass  # advisory: kernels without transparent huge pages

    def free(self) -> bool:
        # The mapping's references: this object's slot and getrefcount's argument, plus
        # one per tensor storage viewing it until that storage is freed.
        return sys.getrefcount(self.mm) <= _FREE_REFS

    def tensor(self, nbytes: int) -> torch.Tensor:
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=nbytes, offset=self.offset)


def _calibrate() -> int:
    probe = _Buffer(mmap.PAGESIZE)
    count = sys.getrefcount(probe.mm)
    probe.mm.close()
    return count


_FREE_REFS = _calibrate() if _ANONYMOUS_MAPS else 0


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[_Buffer] = []  # least recently handed out first
        self._peak_used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of nbytes viewing a pooled buffer."""
        size = _capacity(nbytes)
        with self._lock:
            # The smallest free buffer that fits without wasting more than half of it.
            fits = [b for b in self._buffers if size <= b.size <= 2 * size and b.free()]
            buf = min(fits, key=lambda b: b.size) if fits else _Buffer(size)
            if fits:
                self._buffers.remove(buf)
            self._buffers.append(buf)
            out = buf.tensor(nbytes)
            self._trim()
            return out

    def _trim(self) -> None:
        used = sum(b.size for b in self._buffers if not b.free())
        self._peak_used = max(self._peak_used, used)
        idle = sum(b.size for b in self._buffers) - used
        for buf in list(self._buffers):
            if idle <= self._peak_used:
                break
            if buf.free():
                idle -= buf.size
                self._buffers.remove(buf)
                buf.mm.close()

    def release(self) -> None:
        with self._lock:
            for buf in [b for b in self._buffers if b.free()]:
                self._buffers.remove(buf)
                buf.mm.close()
            self._peak_used = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "buffers": len(self._buffers),
                "bytes": sum(b.size for b in self._buffers),
                "used_bytes": sum(b.size for b in self._buffers if not b.free()),
                "peak_used_bytes": self._peak_used,
            }


_pool = _Pool()


def empty(shape, dtype: torch.dtype, pin_memory: bool = False) -> torch.Tensor:
    """torch.empty on the CPU; from the pool when 1 MiB or more (pinned memory is torch's own)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = 1
    for d in shape:
        numel *= int(d)
    nbytes = numel * dtype.itemsize
    if pin_memory or nbytes < _MIN_BYTES or not _ANONYMOUS_MAPS:
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    return _pool.take(nbytes).view(dtype).view(shape)


def release() -> None:
    """Unmap every pooled buffer that no tensor uses."""
    _pool.release()


def pool_stats() -> dict[str, int]:
    """Pooled buffers, their bytes, the bytes in use now and the most in use at once."""
    return _pool.stats()
