"""GPU kernel benchmark: every op on the torch, cuda and triton backends, on CUDA tensors.

    python bench/gpu_bench.py                          # 16M elements, k = 2, 4, 8, bf16
    python bench/gpu_bench.py --sizes 16M,64M --k 2,8 --ops weighted_sum,dare_merge --out gpu.md

The cases, their minimum traffic and the inputs are bench/benchlib.py's (the
same as the CPU suite), moved to the GPU. Per (op, backend, k): median time of
CUDA-event-timed calls after a warm-up, GB/s from the counted bytes (every
input read once, every output written once), % of the device-to-device copy
bandwidth measured first (bytes read + written), and the speed-up over torch
eager (the reference ops run on the same CUDA tensors); "torch.compile" times the
reference compiled by torch.compile (after a compiling warm-up). A backend that lacks
an op is skipped, so kernels that land later appear without edits. After the
warm-up each case checks `pymerge.ops.last_backend()`, so the wrong path is
never timed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Compile the Triton kernels for the GPU (the test suite's conftest defaults to the interpreter).
os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import benchlib  # noqa: E402
from pymerge import backends, ops  # noqa: E402

BACKENDS = ("torch", "torch.compile", "cuda", "triton")


def _to_cuda(x):
    if isinstance(x, torch.Tensor):
        return x.cuda()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cuda(v) for v in x)
    return x


class GpuInputs(benchlib.Inputs):
    """benchlib's inputs (bf16 base + fine-tunes, derived tensors) on the current CUDA device."""

    def __init__(self, n: int, k_max: int, seed: int = 0):
        super().__init__(n, k_max, seed)
        self.base = self.base.cuda()
        self.models = [m.cuda() for m in self.models]

    def cached(self, key, make):
        if key not in self._derived:
            self._derived[key] = _to_cuda(make())
        return self._derived[key]


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Bytes read + written per second of a device-to-device copy (median of CUDA-event timings)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = event_times(lambda: dst.copy_(src), reps, warmup=3)
    return 2 * nbytes / (statistics.median(ms) / 1e3)


def event_times(fn, reps: int, warmup: int = 2) -> list[float]:
    """Milliseconds of `reps` calls, each between two CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def run_case(case, inputs, k, backend, target_s: float):
    """(median ms, reps) of one case on one backend, or None when the backend lacks the op."""
    if backend == "torch.compile":
        with _compiled_reference(case.op):
            return _time(case, case.call(inputs, k, "torch"), None, target_s)
    if backend != "torch" and not backends.implements(backend, case.op):
        return None
    return _time(case, case.call(inputs, k, backend), backend, target_s)


@contextlib.contextmanager
def _compiled_reference(op: str):
    """ops.<op> replaced by torch.compile of the torch reference, for the cases' closures."""
    compiled = torch.compile(getattr(ops.reference, op))
    original = getattr(ops, op)
    setattr(ops, op, lambda *args, backend=None, **kwargs: compiled(*args, **kwargs))
    try:
        yield
    finally:
        setattr(ops, op, original)


def _time(case, fn, backend, target_s: float):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()  # warm-up: module load, Triton or torch.compile compilation, allocator
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    ran = ops.last_backend()
    if backend is not None and ran != backend:
        raise RuntimeError(f"{case.name}: asked for backend {backend!r} but {ran!r} ran")
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    second = time.perf_counter() - t
    if min(first, second) > 2.0:  # slow torch references: one timed call
        return statistics.median(event_times(fn, 1, warmup=0)), 1
    reps = max(5, min(100, int(target_s / max(second, 1e-5))))
    return statistics.median(event_times(fn, reps, warmup=1)), reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=os.environ.get("PYMERGE_BENCH_SIZES", "16M"),
                   help="elements per tensor, multiples of 1024 (default 16M)")
    p.add_argument("--k", default="2,4,8", help="model counts (default 2,4,8)")
    p.add_argument("--ops", default=os.environ.get("PYMERGE_BENCH_OPS"), help="case or op names (default: all)")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--target-s", type=float, default=0.3, help="seconds of timed calls per measurement")
    p.add_argument("--out", help="write the markdown report here (and a .json beside it)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    if args.ops:
        os.environ["PYMERGE_BENCH_OPS"] = args.ops
    benchlib.K_VALUES = tuple(int(v) for v in args.k.split(","))
    sizes = [benchlib.parse_count(s) for s in args.sizes.split(",") if s.strip()]
    names = [b for b in args.backends.split(",") if b in ("torch", "torch.compile") or b in backends.available()]
    missing = [b for b in args.backends.split(",") if b not in names]

    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth() / 1e9
    header = [
        "# GPU op throughput",
        "",
        f"- device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
        f"torch {torch.__version__} (CUDA {torch.version.cuda})",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: python bench/gpu_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        f"- copy bandwidth (device-to-device, read + written): {copy_gbs:.0f} GB/s",
        f"- backends: {', '.join(names)}" + (f" (not available: {', '.join(missing)})" if missing else ""),
        "- inputs: bf16, [n / 1024, 1024]; GB/s = minimum traffic (bench/benchlib.py) / median time",
        "",
        "| op | k | size | backend | median ms | reps | GB/s | % of copy | vs torch | vs torch.compile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows, records = [], []
    for n in sizes:
        inputs = GpuInputs(n, max(benchlib.K_VALUES))
        for case in benchlib.selected_cases():
            for k in case.ks():
                base_ms = compiled_ms = None
                for backend in names:
                    try:
                        res = run_case(case, inputs, k, backend, args.target_s)
                    except Exception as exc:  # report and go on: one failing op must not hide the rest
                        line = f"| {case.name} | {k or '-'} | {benchlib.fmt_count(n)} | {backend} | error: " \
                               f"{type(exc).__name__}: {str(exc)[:80]} | | | | | |"
                        print(line, flush=True)
                        rows.append(line)
                        continue
                    if res is None:
                        continue
                    ms, reps = res
                    nbytes = case.traffic(n, k or 1)
                    gbs = nbytes / (ms / 1e3) / 1e9
                    if backend == "torch":
                        base_ms = ms
                    elif backend == "torch.compile":
                        compiled_ms = ms
                    speedup = f"{base_ms / ms:.1f}x" if base_ms else "-"
                    vs_compiled = f"{compiled_ms / ms:.1f}x" if compiled_ms else "-"
                    line = (f"| {case.name} | {k or '-'} | {benchlib.fmt_count(n)} | {backend} | {ms:.3f} | {reps} | "
                            f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {speedup} | {vs_compiled} |")
                    print(line, flush=True)
                    rows.append(line)
                    records.append(dict(op=case.name, k=k, n=n, backend=backend, ms=ms, reps=reps, bytes=nbytes,
                                        gbs=gbs, pct_of_copy=100 * gbs / copy_gbs,
                                        speedup_vs_torch=(base_ms / ms) if base_ms else None,
                                        speedup_vs_compile=(compiled_ms / ms) if compiled_ms else None))
        del inputs
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("\n".join(header + rows) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            dict(device=props.name, copy_gbs=copy_gbs, results=records), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
