"""Exact streaming selection (order statistics) of fp32 values without a full sort.

Used for model-scope statistics (the TIES per-model threshold, PCB quantiles): the data of a
whole model does not fit in memory at once, so it is streamed in chunks, once per phase.

Values are mapped to order-preserving unsigned 32-bit keys (held in int64):
    bits = the fp32 bit pattern; key = bits | 0x80000000 if the sign bit is clear
                                  key = bits ^ 0xFFFFFFFF if it is set
so that key(a) < key(b) iff a < b for non-NaN a, b (with -0.0 below +0.0; RadixSelect
canonicalises -0.0 to +0.0 first, so the two zeros are one value).

RadixSelect finds the value at a given 0-based ascending rank in two passes: phase 1 builds
a 65536-bin histogram of the high 16 key bits and picks the bin holding the rank; phase 2
histograms the low 16 bits of the values inside that bin. Counts are int64, so the result
is exact for any number of values.

The histograms can also be computed elsewhere (a compiled kernel that derives the values on
the fly, e.g. |theta_i - theta_0|) and added with `RadixSelect.add_histogram`:
`abs_tau_histogram` and `order_key_histogram` below are the torch versions of those ops, and
`histogram_op` returns the compiled one where a backend has it.
"""

from __future__ import annotations

from typing import Sequence

import torch

RADIX_BITS = 16
RADIX_BINS = 1 << RADIX_BITS
_LOW_MASK = RADIX_BINS - 1
_SIGN = 0x80000000
_MASK32 = 0xFFFFFFFF
# Key given to NaN by the histogram ops: its high digit (0xFFFF) holds no other value.
NAN_KEY = _MASK32
_ABS_OFFSET = _SIGN >> RADIX_BITS  # order_key(|x|) high digit = abs_key(x) high digit + this


def fp32_order_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving keys of fp32 values: int64 tensor of uint32 values (same shape).

    Non-negative (sign bit clear): the sign bit is set; negative: all 32 bits are flipped.
    -0.0 keys just below +0.0; canonicalise it first where the two must be equal.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"fp32_order_key takes fp32 values, got {x.dtype}")
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    return torch.where(bits >= _SIGN, bits ^ _MASK32, bits | _SIGN)


def fp32_from_order_key(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of fp32_order_key: int64 keys (uint32 values) back to fp32 values."""
    if keys.dtype != torch.int64:
        raise ValueError(f"keys must be int64, got {keys.dtype}")
    bits = torch.where(keys >= _SIGN, keys ^ _SIGN, keys ^ _MASK32)
    # uint32 -> the int32 with the same bit pattern, then reinterpret
    signed = torch.where(bits >= _SIGN, bits - (1 << 32), bits).to(torch.int32)
    return signed.view(torch.float32)


def _check_digit(shift: int, prefix: int | None) -> None:
    if shift not in (0, 16) or isinstance(shift, bool):
        raise ValueError(f"shift must be 16 (high digit) or 0 (low digit), got {shift!r}")
    if shift == 16 and prefix is not None:
        raise ValueError("prefix applies to the low digit only (shift=0)")
    if shift == 0 and (prefix is None or isinstance(prefix, bool) or not 0 <= int(prefix) <= _LOW_MASK):
        raise ValueError(f"the low digit (shift=0) needs a prefix in [0, 65535], got {prefix!r}")


def _digit_histogram(keys: torch.Tensor, shift: int, prefix: int | None) -> torch.Tensor:
    if shift == 16:
        idx = keys >> RADIX_BITS
    else:
        idx = keys[(keys >> RADIX_BITS) == int(prefix)] & _LOW_MASK
    return torch.bincount(idx, minlength=RADIX_BINS)


def abs_tau_histogram(base: torch.Tensor, tensor: torch.Tensor, *, shift: int, prefix: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram of one 16-bit digit of abs_key(f32(tensor) - f32(base)).

    abs_key(x) = the fp32 bit pattern of x with the sign bit cleared (orders |x|; both zeros
    are 0); NaN gets NAN_KEY. shift=16: the high digit of every key; shift=0: the low digit
    of the keys whose high digit is `prefix`. torch version of the compiled op.
    """
    _check_digit(shift, prefix)
    if tensor.shape != base.shape:
        raise ValueError(f"tensor: shape {tuple(tensor.shape)} != base {tuple(base.shape)}")
    tau = tensor.reshape(-1).to(torch.float32) - base.reshape(-1).to(torch.float32)
    keys = tau.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    keys = torch.where(torch.isnan(tau), torch.full_like(keys, NAN_KEY), keys)
    return _digit_histogram(keys, shift, prefix)


def order_key_histogram(values: torch.Tensor, *, shift: int, prefix: int | None = None) -> torch.Tensor:
    """int64 [65536] histogram of one 16-bit digit of fp32_order_key(values) (-0.0 counted as
    +0.0, NaN as NAN_KEY); shift and prefix as in `abs_tau_histogram`. torch version of the
    compiled op; fp16/bf16 values are upcast exactly."""
    _check_digit(shift, prefix)
    if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"values must be fp32, fp16 or bf16, got {values.dtype}")
    x = values.reshape(-1).to(torch.float32)
    x = torch.where(x == 0, torch.zeros((), dtype=torch.float32, device=x.device), x)
    keys = fp32_order_key(x)
    keys = torch.where(torch.isnan(x), torch.full_like(keys, NAN_KEY), keys)
    return _digit_histogram(keys, shift, prefix)


def histogram_op(name: str, backend: str, device_type: str):
    """The compiled histogram op `name` ("abs_tau_histogram" or "order_key_histogram") to use
    for tensors on `device_type` under the `backend` choice, or None where no compiled one
    applies (then feed the values with `RadixSelect.update`).

    "auto": the compiled kernel of the device (cpu, cuda), else on CUDA tensors Triton
    compiled for the GPU. "triton" also takes CPU tensors while the kernels run in
    Triton's interpreter (TRITON_INTERPRET=1, how CI tests them).
    """
    from pymerge import backends

    if backend == "auto":
        candidates = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device_type, ())
    elif backend in ("cpu", "cuda", "triton"):
        candidates = (backend,)
    else:
        return None
    for candidate in candidates:
        if not backends.implements(candidate, name):
            continue
        if candidate == "triton":
            from pymerge.backends.triton import interpreted

            fits = (device_type == "cuda" and not (backend == "auto" and interpreted())) or (
                device_type == "cpu" and backend == "triton" and interpreted()
            )
        else:
            fits = device_type == candidate
        if fits:
            return backends.select(name, candidate, device_type)[1]
    return None


class RadixSelect:
    """Exact k-th smallest of n_streams multisets of fp32 values fed in chunks, 2 passes.

    Usage (the caller streams the same data in both phases, in any chunking and order):
        sel = RadixSelect(n_streams, ranks)       # ranks[s]: 0-based ascending rank
        for chunk ...: sel.update(s, values)      # phase 1
        sel.next_phase()
        for chunk ...: sel.update(s, values)      # phase 2, same values again
        sel.next_phase()                          # optional: values() ends phase 2 too
        sel.done -> True; sel.values() -> [value at ranks[s] for each stream]
    ranks may also be given after phase 1 with set_ranks() (e.g. once the totals are known
    from `totals`). fp16/bf16 values are upcast exactly; -0.0 counts as +0.0; NaN raises.
    A rank outside [0, count) raises ValueError, and so does a phase-2 count that differs
    from phase 1 (the data was not streamed identically).

    Instead of update(), a chunk may come as a precomputed digit histogram: add_histogram();
    phase 2's histograms then filter on prefix(stream). Both ways mix freely.
    """

    def __init__(self, n_streams: int, ranks: Sequence[int] | None = None):
        if isinstance(n_streams, bool) or not isinstance(n_streams, int) or n_streams < 1:
            raise ValueError(f"n_streams must be a positive int, got {n_streams!r}")
        self.n_streams = n_streams
        self._ranks: list[int] | None = None
        if ranks is not None:
            self.set_ranks(ranks)
        self._phase = 0
        self._hist: list[torch.Tensor | None] = [None] * n_streams
        self._count = [0] * n_streams
        self._totals: list[int] | None = None
        self._prefix: list[int] = [0] * n_streams
        self._rank_in_bin: list[int] = [0] * n_streams
        self._values: list[float] | None = None

    @property
    def phase(self) -> int:
        """1 while histogramming high bits, 2 for low bits, 3 once done."""
        return self._phase + 1

    @property
    def done(self) -> bool:
        return self._phase == 2

    @property
    def totals(self) -> list[int]:
        """Values counted per stream so far in phase 1 (final once phase 1 has ended)."""
        return list(self._totals) if self._totals is not None else list(self._count)

    def set_ranks(self, ranks: Sequence[int]) -> None:
        if getattr(self, "_phase", 0) != 0:
            raise ValueError("ranks can only be set before phase 1 ends")
        ranks = list(ranks)
        if len(ranks) != self.n_streams:
            raise ValueError(f"{len(ranks)} ranks for {self.n_streams} streams")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int):
                raise ValueError(f"ranks must be ints, got {r!r}")
        self._ranks = ranks

    def update(self, stream: int, values: torch.Tensor) -> None:
        """Add one chunk of stream `stream`'s values to the current phase's histogram."""
        if self.done:
            raise ValueError("selection is done; no more updates")
        if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < self.n_streams:
            raise ValueError(f"stream must be in [0, {self.n_streams}), got {stream!r}")
        if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"values must be fp32, fp16 or bf16, got {values.dtype}")
        x = values.reshape(-1).to(torch.float32)
        if x.numel() == 0:
            return
        if bool(torch.isnan(x).any()):
            raise ValueError(f"stream {stream}: NaN values cannot be ranked")
        x = torch.where(x == 0, torch.zeros((), dtype=torch.float32, device=x.device), x)
        keys = fp32_order_key(x)
        self._count[stream] += x.numel()
        if self._phase == 0:
            idx = keys >> RADIX_BITS
        else:
            idx = keys[(keys >> RADIX_BITS) == self._prefix[stream]] & _LOW_MASK
        h = torch.bincount(idx, minlength=RADIX_BINS)
        if self._hist[stream] is None:
            self._hist[stream] = h
        else:
            self._hist[stream] += h.to(self._hist[stream].device)

    def prefix(self, stream: int, keys: str = "order") -> int:
        """Phase 2: the high digit phase-2 histograms of `stream` filter on (their `prefix=`).

        keys="abs": as a digit of abs keys (see add_histogram)."""
        if self._phase != 1:
            raise ValueError("the prefix is known in phase 2 only")
        self._check_stream(stream)
        p = self._prefix[stream]
        if keys == "order":
            return p
        if keys != "abs":
            raise ValueError(f"keys must be 'order' or 'abs', got {keys!r}")
        if p < _ABS_OFFSET:
            raise ValueError(f"stream {stream}: the selected value is negative, it has no abs key")
        return p - _ABS_OFFSET

    def add_histogram(self, stream: int, hist: torch.Tensor, *, keys: str = "order", count: int | None = None) -> None:
        """Add one chunk of stream `stream` as a precomputed 65536-bin digit histogram.

        Phase 1: the histogram of the high 16 key bits of the chunk's values; phase 2: of the
        low 16 bits of those whose high 16 bits are prefix(stream, keys). keys="order": keys
        are fp32_order_key of the values with -0.0 as +0.0 (`order_key_histogram`);
        keys="abs": the stream's values are magnitudes |x| and the keys are abs keys, the bit
        patterns with the sign cleared (`abs_tau_histogram`). count: how many values the chunk
        has; in phase 1 it is hist.sum() (the default), in phase 2 it must be given (the
        histogram holds only the values inside the bin) so that the phase-2 check can hold.
        Phase-1 counts in the NaN bin 0xFFFF raise ValueError, as NaN values do in update().
        """
        if self.done:
            raise ValueError("selection is done; no more updates")
        self._check_stream(stream)
        if keys not in ("order", "abs"):
            raise ValueError(f"keys must be 'order' or 'abs', got {keys!r}")
        h = torch.as_tensor(hist)
        if h.dtype.is_floating_point or h.dtype.is_complex or h.dtype == torch.bool or h.numel() != RADIX_BINS:
            raise ValueError(f"hist must hold {RADIX_BINS} integer counts, got {h.numel()} of {h.dtype}")
        h = h.reshape(-1).to(torch.int64)
        if bool((h < 0).any()):
            raise ValueError("hist has negative counts")
        total = int(h.sum())
        if self._phase == 0:
            if int(h[-1]) > 0:
                raise ValueError(f"stream {stream}: NaN values cannot be ranked")
            if count is not None and int(count) != total:
                raise ValueError(f"stream {stream}: count {count} != the {total} values in hist")
            if keys == "abs":
                if int(h[_ABS_OFFSET:].sum()) > 0:
                    raise ValueError("abs keys have the top bit clear: hist[32768:] must be empty")
                h = torch.cat([torch.zeros(_ABS_OFFSET, dtype=torch.int64, device=h.device), h[:_ABS_OFFSET]])
            n = total
        else:
            if count is None:
                raise ValueError("a phase-2 histogram needs count= (the values of the chunk, not only those in the bin)")
            n = int(count)
            if total > n:
                raise ValueError(f"stream {stream}: hist holds {total} values, more than count {n}")
        self._count[stream] += n
        if self._hist[stream] is None:
            self._hist[stream] = h.clone()  # owned: later chunks add into it in place
        else:
            self._hist[stream] += h.to(self._hist[stream].device)

    def reduce(self, reduce) -> None:
        """Sum the current phase's histograms and counts over the ranks of a distributed run.

        reduce(tensor) returns the element-wise sum over ranks; int64 sums are exact, so the
        selection ends as if one process had streamed every rank's values.
        """
        if self.done:
            raise ValueError("selection is done; nothing to reduce")
        zeros = torch.zeros(RADIX_BINS, dtype=torch.int64)
        hist = torch.stack([zeros if h is None else h.to("cpu", torch.int64) for h in self._hist])
        counts = reduce(torch.tensor(self._count, dtype=torch.int64))
        hist = reduce(hist)
        self._hist = [h.clone() for h in hist.unbind(0)]
        self._count = [int(c) for c in counts.tolist()]

    def _check_stream(self, stream: int) -> None:
        if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < self.n_streams:
            raise ValueError(f"stream must be in [0, {self.n_streams}), got {stream!r}")

    @staticmethod
    def _locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
        """(bin, rank within the bin) of the 0-based rank in a histogram."""
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype, device=cum.device), right=True))
        if b >= hist.numel():
            raise ValueError("the values of phase 2 differ from those of phase 1")
        before = int(cum[b]) - int(hist[b])
        return b, rank - before

    def next_phase(self) -> None:
        """End the current phase: phase 1 picks each stream's high-bit bin, phase 2 the value."""
        if self.done:
            raise ValueError("selection is already done")
        if self._phase == 0:
            if self._ranks is None:
                raise ValueError("ranks were never set (pass them to RadixSelect or set_ranks)")
            for s in range(self.n_streams):
                r, n = self._ranks[s], self._count[s]
                if not 0 <= r < n:
                    raise ValueError(f"stream {s}: rank {r} is outside [0, {n}) of the values fed")
                self._prefix[s], self._rank_in_bin[s] = self._locate(self._hist[s], r)
            self._totals = list(self._count)
        else:
            keys = []
            for s in range(self.n_streams):
                if self._count[s] != self._totals[s]:
                    raise ValueError(
                        f"stream {s}: phase 2 saw {self._count[s]} values, phase 1 saw {self._totals[s]}"
                    )
                hist = self._hist[s]
                low, _ = self._locate(hist, self._rank_in_bin[s])
                keys.append((self._prefix[s] << RADIX_BITS) | low)
            self._values = fp32_from_order_key(torch.tensor(keys, dtype=torch.int64)).tolist()
        self._phase += 1
        self._hist = [None] * self.n_streams
        self._count = [0] * self.n_streams

    def values(self) -> list[float]:
        """The selected value of each stream (exact fp32 values as Python floats).

        Called during phase 2 it ends that phase first (as next_phase() would).
        """
        if self._phase == 0:
            raise ValueError("selection is not done; stream the data in both phases first")
        if self._phase == 1:
            self.next_phase()
        return list(self._values)
