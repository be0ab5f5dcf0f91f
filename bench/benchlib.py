"""Shared pieces of the op benchmarks: the cases, their minimum traffic, inputs, timing and tables.

Used by `test_ops_bench.py` (pytest-benchmark) and `throughput.py` (plain script).

Minimum traffic
---------------
GB/s counts the bytes an ideal single-pass kernel must move: every input read
once and every output written once (s = bytes per element of the inputs, 2 for
bf16; n = elements per tensor; k = number of models; W = ceil(n / 32) mask words
of 4 bytes). Ops that need two passes (trimming by magnitude, norms before a
slerp) are still counted once, so their GB/s is a fraction of what the machine
can move and the "% of copy" column shows how far each one is from the bound.

| case                 | read                        | written                  |
|----------------------|-----------------------------|--------------------------|
| weighted_sum         | k n s                       | n s                      |
| weighted_sum+base    | (k + 1) n s                 | n s                      |
| ties_merge           | (k + 1) n s                 | n s                      |
| ties_merge_model     | (k + 1) n s                 | n s                      |
| ties_sign_sum        | (k + 1) n s                 | 0 (one integer)          |
| dare_merge(linear)   | (k + 1) n s                 | n s                      |
| dare_merge(ties)     | (k + 1) n s                 | n s                      |
| dare_keep_mask       | 0                           | n (bool)                 |
| breadcrumbs_merge    | (k + 1) n s                 | n s                      |
| emr_elect            | (k + 1) n s                 | n s (u) + 4 k W (masks)  |
| emr_reconstruct      | 2 n s (base, u) + 4 W       | n s                      |
| pack_bits            | n (bool)                    | 4 W                      |
| unpack_bits          | 4 W                         | n (bool)                 |
| slerp                | 2 n s                       | n s                      |
| pcb_merge            | (k + 1) n s                 | n s                      |
| pcb_scores           | (k + 1) n s                 | 4 k n (fp32 scores)      |
| pcb_merge_with_stats | (k + 1) n s                 | n s                      |
| permute_average      | k n s + 8 k (rows + cols)   | n s                      |

Scalars and per-model statistics (a few bytes) are not counted. The copy
bandwidth (bytes read + bytes written per second of a 256 MiB tensor copy, timed
between the case's own rounds: CopyProbe) is the bound the "% of copy" column is
taken against.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

# torch's OpenMP workers spin for a few ms after each parallel region unless told to
# wait passively, and on 2 cores a spinning worker takes a core from the next timed
# call (CopyProbe's copy runs right before each round). Read when torch loads libgomp:
# importing torch before this module leaves torch's own setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from pymerge import backends, ops  # noqa: E402
from pymerge.ops import reference  # noqa: E402

MIB = 1 << 20
DTYPE = torch.bfloat16
K_VALUES = (2, 4, 8)
FULL_SIZES = (1 << 20, 1 << 24)
QUICK_SIZES = (1 << 20,)
ROW = 1024  # tensors are [n / ROW, ROW], a Llama-like matrix; n must be a multiple of ROW

# Timing: one calibration call (which also warms up), then enough rounds to fill
# TARGET_S seconds, at least MIN_ROUNDS (only one for calls of SLOW_S or more: the torch
# reference of the sparse ops at 16M elements takes tens of seconds a call).
TARGET_S = float(os.environ.get("PYMERGE_BENCH_TARGET_S", "0.5" if os.environ.get("PYMERGE_BENCH_QUICK", "") not in ("", "0")
                                else "1.0"))
MIN_ROUNDS = 3
MAX_ROUNDS = 50
SLOW_S = 2.0


def quick_mode() -> bool:
    return os.environ.get("PYMERGE_BENCH_QUICK", "") not in ("", "0")


def bench_sizes() -> tuple[int, ...]:
    """Element counts to run: PYMERGE_BENCH_SIZES (e.g. "1M,16M") else quick or full defaults."""
    text = os.environ.get("PYMERGE_BENCH_SIZES")
    if text:
        return tuple(parse_count(t) for t in text.split(",") if t.strip())
    return QUICK_SIZES if quick_mode() else FULL_SIZES


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    value = int(float(text[:-1] if text[-1:] in "KMG" else text) * mult)
    if value <= 0 or value % ROW:
        raise ValueError(f"size {text!r}: must be a positive multiple of {ROW} elements")
    return value


def fmt_count(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def rounds_for(seconds: float) -> int:
    if seconds >= SLOW_S:
        return 1
    return max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(TARGET_S / max(seconds, 1e-9))))


# ---------------------------------------------------------------------------
# Inputs


class Inputs:
    """bf16 inputs of one size: a base and up to max(K_VALUES) fine-tunes (base + small noise), plus derived tensors."""

    def __init__(self, n: int, k_max: int = max(K_VALUES), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        shape = (n // ROW, ROW)
        base32 = torch.randn(shape, generator=g) * ROW**-0.5
        self.n = n
        self.shape = shape
        self.base = base32.to(DTYPE)
        self.models = [(base32 + 0.02 * ROW**-0.5 * torch.randn(shape, generator=g)).to(DTYPE) for _ in range(k_max)]
        del base32
        self._derived: dict[Any, Any] = {}

    def cached(self, key, make: Callable[[], Any]):
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    # Statistics estimated on a prefix (their values only need to be plausible).
    def _prefix(self, k: int, m: int = 1 << 16):
        return self.base.reshape(-1)[:m], [t.reshape(-1)[:m] for t in self.models[:k]]

    def ties_thresholds(self, k: int) -> list[float]:
        def make():
            b, ms = self._prefix(k)
            return [reference.ties.ties_model_threshold((t.float() - b.float()).abs(), 0.5) for t in ms]
        return self.cached(("thr", k), make)

    def pcb_stats(self, k: int):
        def make():
            b, ms = self._prefix(k)
            tau = torch.stack([t.float() - b.float() for t in ms])
            lo, hi = reference.pcb.pcb_clip_bounds(tau.abs(), 0.01)
            beta = reference.pcb_scores(b, ms, lo, hi)
            q, m = reference.pcb.pcb_score_stats(beta, 0.1)
            return lo, hi, q, m
        return self.cached(("pcb", k), make)

    def emr(self):
        def make():
            # u and one mask plane in the layouts emr_elect produces (random content).
            g = torch.Generator().manual_seed(1)
            u = (torch.randn(self.shape, generator=g) * 0.02 * ROW**-0.5).to(DTYPE)
            mask = torch.rand(self.n, generator=g) < 0.5
            return u, reference.pack_bits(mask), mask
        return self.cached("emr", make)

    def perm_maps(self, k: int):
        def make():
            g = torch.Generator().manual_seed(2)
            rows, cols = self.shape
            return ([torch.randperm(rows, generator=g) for _ in range(k)],
                    [torch.randperm(cols, generator=g) for _ in range(k)])
        return self.cached(("perm", k), make)


# ---------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    """One benchmarked call of an op: how to call it and its minimum traffic in bytes."""

    name: str  # display name (unique)
    op: str  # the function in pymerge.ops
    uses_k: bool
    call: Callable[[Inputs, int, str], Callable[[], Any]]  # (inputs, k, backend) -> a no-argument call
    traffic: Callable[[int, int], int]  # (n, k) -> bytes

    def ks(self) -> tuple[int | None, ...]:
        """The model counts to run: K_VALUES, or one entry for ops without k (slerp: always 2 models)."""
        if self.uses_k:
            return K_VALUES
        return (2,) if self.op == "slerp" else (None,)


S = DTYPE.itemsize


def _words(n: int) -> int:
    return 4 * ((n + 31) // 32)


def _merge_traffic(n: int, k: int) -> int:
    return (k + 1) * n * S + n * S


def _op(name: str):
    return getattr(ops, name)


def _case_calls():
    def ws(x, k, b):
        return lambda: ops.weighted_sum(x.models[:k], [1.0] * k, normalize=True, backend=b)

    def ws_base(x, k, b):
        return lambda: ops.weighted_sum(x.models[:k], [1.0] * k, base=x.base, backend=b)

    def ties(x, k, b):
        return lambda: ops.ties_merge(x.base, x.models[:k], 1.0, 0.5, backend=b)

    def ties_model(x, k, b):
        thr = x.ties_thresholds(k)
        return lambda: ops.ties_merge_model(x.base, x.models[:k], thr, 1, backend=b)

    def ties_sign(x, k, b):
        thr = x.ties_thresholds(k)
        return lambda: ops.ties_sign_sum(x.base, x.models[:k], thr, backend=b)

    def dare(combine):
        def make(x, k, b):
            return lambda: ops.dare_merge(x.base, x.models[:k], 1.0, 0.5, name="model.layers.0.mlp.up_proj.weight",
                                          seed=0, combine=combine, backend=b)
        return make

    def dare_mask(x, k, b):
        return lambda: ops.dare_keep_mask(x.n, name="model.layers.0.mlp.up_proj.weight", seed=0, model_index=0,
                                          density=0.5, backend=b)

    def breadcrumbs(x, k, b):
        return lambda: ops.breadcrumbs_merge(x.base, x.models[:k], 1.0, 0.5, 0.01, backend=b)

    def emr_elect(x, k, b):
        return lambda: ops.emr_elect(x.base, x.models[:k], backend=b)

    def emr_reconstruct(x, k, b):
        u, words, _ = x.emr()
        return lambda: ops.emr_reconstruct(x.base, u, words, 1.5, backend=b)

    def pack(x, k, b):
        _, _, mask = x.emr()
        return lambda: ops.pack_bits(mask, backend=b)

    def unpack(x, k, b):
        _, words, _ = x.emr()
        return lambda: ops.unpack_bits(words, x.n, backend=b)

    def slerp(x, k, b):
        return lambda: ops.slerp(x.base, x.models[0], 0.3, backend=b)

    def pcb(x, k, b):
        return lambda: ops.pcb_merge(x.base, x.models[:k], backend=b)

    def pcb_scores(x, k, b):
        lo, hi, _, _ = x.pcb_stats(k)
        return lambda: ops.pcb_scores(x.base, x.models[:k], lo, hi, backend=b)

    def pcb_stats(x, k, b):
        lo, hi, q, m = x.pcb_stats(k)
        return lambda: ops.pcb_merge_with_stats(x.base, x.models[:k], lo, hi, q, m, backend=b)

    def permute(x, k, b):
        rows, cols = x.perm_maps(k)
        return lambda: ops.permute_average(x.models[:k], [1.0 / k] * k, rows, cols, backend=b)

    return [
        Case("weighted_sum", "weighted_sum", True, ws, lambda n, k: k * n * S + n * S),
        Case("weighted_sum+base", "weighted_sum", True, ws_base, _merge_traffic),
        Case("ties_merge", "ties_merge", True, ties, _merge_traffic),
        Case("ties_merge_model", "ties_merge_model", True, ties_model, _merge_traffic),
        Case("ties_sign_sum", "ties_sign_sum", True, ties_sign, lambda n, k: (k + 1) * n * S),
        Case("dare_merge(linear)", "dare_merge", True, dare("linear"), _merge_traffic),
        Case("dare_merge(ties)", "dare_merge", True, dare("ties"), _merge_traffic),
        Case("dare_keep_mask", "dare_keep_mask", False, dare_mask, lambda n, k: n),
        Case("breadcrumbs_merge", "breadcrumbs_merge", True, breadcrumbs, _merge_traffic),
        Case("emr_elect", "emr_elect", True, emr_elect, lambda n, k: (k + 1) * n * S + n * S + k * _words(n)),
        Case("emr_reconstruct", "emr_reconstruct", False, emr_reconstruct, lambda n, k: 3 * n * S + _words(n)),
        Case("pack_bits", "pack_bits", False, pack, lambda n, k: n + _words(n)),
        Case("unpack_bits", "unpack_bits", False, unpack, lambda n, k: _words(n) + n),
        Case("slerp", "slerp", False, slerp, lambda n, k: 3 * n * S),
        Case("pcb_merge", "pcb_merge", True, pcb, _merge_traffic),
        Case("pcb_scores", "pcb_scores", True, pcb_scores, lambda n, k: (k + 1) * n * S + 4 * k * n),
        Case("pcb_merge_with_stats", "pcb_merge_with_stats", True, pcb_stats, _merge_traffic),
        Case("permute_average", "permute_average", True, permute,
             lambda n, k: k * n * S + n * S + 8 * k * (n // ROW + ROW)),
    ]


CASES: list[Case] = _case_calls()
CASE_BY_NAME = {c.name: c for c in CASES}

# Every op of pymerge.ops has a case (a new op without one fails loudly here).
_missing = set(ops.OPS) - {c.op for c in CASES}
if _missing:
    raise RuntimeError(f"bench/benchlib.py has no benchmark case for {sorted(_missing)}")


def bench_backends() -> tuple[str, ...]:
    """Backends compared: the torch reference and every CPU kernel backend that imports here."""
    return tuple(b for b in ("torch", "cpu") if b in backends.available())


def runs(case: Case, backend: str) -> bool:
    return backend == "torch" or backends.implements(backend, case.op)


def selected_cases() -> list[Case]:
    """PYMERGE_BENCH_OPS (comma-separated case names or op names) narrows the cases."""
    text = os.environ.get("PYMERGE_BENCH_OPS")
    if not text:
        return list(CASES)
    wanted = {t.strip() for t in text.split(",") if t.strip()}
    unknown = wanted - {c.name for c in CASES} - {c.op for c in CASES}
    if unknown:
        raise ValueError(f"PYMERGE_BENCH_OPS: unknown {sorted(unknown)}; known: {', '.join(c.name for c in CASES)}")
    return [c for c in CASES if c.name in wanted or c.op in wanted]


def checked_call(case: Case, inputs: Inputs, k: int | None, backend: str) -> tuple[Callable[[], Any], float]:
    """(the call, seconds of a first run): the first run warms up, calibrates the rounds and
    checks that the backend that ran is the one asked for (a benchmark never times the wrong path)."""
    fn = case.call(inputs, k, backend)
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    ran = ops.last_backend()
    if ran != backend:
        raise RuntimeError(f"{case.name}: asked for backend {backend!r} but {ran!r} ran")
    return fn, seconds


def time_call(fn: Callable[[], Any], rounds: int, probe: "CopyProbe | None" = None) -> float:
    """Median seconds of `rounds` calls (host clock: every backend here runs synchronously on the CPU).
    With a probe, each round starts with one (untimed here) probe copy."""
    times = []
    for _ in range(rounds):
        if probe is not None:
            probe()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# Machine


class CopyProbe:
    """The copy bandwidth while one case runs: each call times one dst.copy_(src) of an nbytes bf16 buffer.

    On a shared VM the bandwidth can halve for minutes and come back, so "% of copy"
    is taken against copies interleaved with the case's own rounds (one before each)
    rather than against one figure from the start of the run. The copy also evicts
    the case's inputs from the cache, so every round reads them from memory.
    """

    def __init__(self, nbytes: int = 256 * MIB):
        self.src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)
        self.nbytes = 2 * nbytes  # read + written
        self.times: list[float] = []

    def __call__(self) -> None:
        t = time.perf_counter()
        self.dst.copy_(self.src)
        self.times.append(time.perf_counter() - t)

    def restart(self) -> None:
        """Forget the copies timed so far: a new case starts."""
        self.times.clear()

    def gbs(self) -> float:
        """GB/s (read + written) of the median copy since the last restart."""
        if not self.times:
            raise RuntimeError("CopyProbe.gbs: no copy timed since the last restart")
        return self.nbytes / statistics.median(self.times) / 1e9


def copy_bandwidth(nbytes: int = 256 * MIB, reps: int = 10) -> dict[str, float]:
    """Bytes read + written per second of a torch copy of an nbytes buffer (median of reps).

    "copy_gbs": into a preallocated destination (CopyProbe's copy);
    "alloc_copy_gbs": torch.empty_like(x).copy_(x), which also pays the page faults
    of a fresh output, as every op in the suite does.
    """
    probe = CopyProbe(nbytes)
    for _ in range(reps):
        probe()
    t_alloc = time_call(lambda: torch.empty_like(probe.src).copy_(probe.src), reps)
    return {"bytes": probe.nbytes, "copy_gbs": probe.gbs(), "alloc_copy_gbs": probe.nbytes / t_alloc / 1e9}


def command_line(argv: list[str]) -> str:
    """The command as typed: `python -m pytest ...` or `python script ...`, after the PYMERGE_BENCH_* variables set."""
    import shlex

    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("PYMERGE_BENCH_"))
    head = ["python", "-m", "pytest"] if argv[0].endswith(("pytest/__main__.py", "/pytest", "py.test")) else ["python", argv[0]]
    return " ".join(filter(None, [env, shlex.join(head + argv[1:])]))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    threads = f"torch threads {torch.get_num_threads()}"
    if "cpu" in backends.available():
        from pymerge.backends import cpu as cpu_backend

        threads += f", pymerge cpu threads {cpu_backend.get_num_threads()}"
    return (f"{cpu_model()}, {os.cpu_count()} cores ({threads}); torch {torch.__version__}; {platform.node()}; "
            f"load average (1 min) {os.getloadavg()[0]:.1f}")


# ---------------------------------------------------------------------------
# Results


@dataclass
class Result:
    case: str
    backend: str
    k: int | None
    n: int
    median_s: float
    rounds: int
    nbytes: int
    copy_gbs: float  # the copy bandwidth measured between this case's rounds (CopyProbe)

    @property
    def gbs(self) -> float:
        return self.nbytes / self.median_s / 1e9

    @property
    def pct_of_copy(self) -> float:
        return 100 * self.gbs / self.copy_gbs


def torch_only_ops(results: list[Result]) -> list[str]:
    """Ops that ran on the torch reference but not on the cpu backend in these results (what was collected,
    not what the backend offers at the end of the run)."""
    ran = {b: {CASE_BY_NAME[r.case].op for r in results if r.backend == b} for b in ("torch", "cpu")}
    return sorted(ran["torch"] - ran["cpu"])


def markdown_tables(results: list[Result]) -> str:
    """One markdown table per case: backend, k, size, median ms, GB/s, the copy bandwidth during the case,
    % of it, speed-up vs torch."""
    torch_median = {(r.case, r.k, r.n): r.median_s for r in results if r.backend == "torch"}
    out = []
    for case in [c.name for c in CASES]:
        rows = [r for r in results if r.case == case]
        if not rows:
            continue
        rows.sort(key=lambda r: (r.n, r.k or 0, r.backend != "torch", r.backend))
        out.append(f"### {case}\n")
        out.append("| backend | k | size | median ms | rounds | GB/s | copy GB/s | % of copy | vs torch |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            ref = torch_median.get((r.case, r.k, r.n))
            speed = f"{ref / r.median_s:.2f}x" if ref else "-"
            k = "-" if r.k is None else str(r.k)
            out.append(f"| {r.backend} | {k} | {fmt_count(r.n)} | {r.median_s * 1e3:.3f} | {r.rounds} | {r.gbs:.2f} "
                       f"| {r.copy_gbs:.1f} | {r.pct_of_copy:.1f}% | {speed} |")
        out.append("")
    return "\n".join(out)
