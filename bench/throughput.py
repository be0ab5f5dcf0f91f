"""Throughput of every merge op, torch reference against the cpu backend: a markdown table per op.

    python bench/throughput.py                       # 1M and 16M elements, k = 2, 4, 8, bf16
    python bench/throughput.py --quick               # 1M only
    python bench/throughput.py --ops ties_merge,slerp --sizes 4M --k 2,8 --out bench/results/x.md

Columns: backend, k (models), size (elements per tensor), median ms, rounds
timed, GB/s (the op's minimum traffic, see bench/benchlib.py, over the median),
the copy bandwidth measured between the case's rounds, % of it, speed-up vs the torch
reference (torch eager). The cpu backend is run for the ops it implements at
run time. No pytest needed; the same cases as bench/test_ops_bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (as PYMERGE_BENCH_QUICK=1)")
    p.add_argument("--sizes", help="elements per tensor, e.g. 1M,16M (multiples of 1024)")
    p.add_argument("--k", help="model counts, e.g. 2,4,8")
    p.add_argument("--ops", help="case or op names, comma-separated (default: all)")
    p.add_argument("--backends", help="comma-separated, default: torch and cpu where available")
    p.add_argument("--target-s", type=float, help="seconds of timed rounds per measurement (default 1, 0.5 with --quick)")
    p.add_argument("--out", help="also write the tables, with a header (machine, date, command), to this file")
    args = p.parse_args(argv)
    command = benchlib.command_line([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))  # before the env below

    if args.quick:
        os.environ["PYMERGE_BENCH_QUICK"] = "1"
    if args.sizes:
        os.environ["PYMERGE_BENCH_SIZES"] = args.sizes
    if args.ops:
        os.environ["PYMERGE_BENCH_OPS"] = args.ops
    if args.target_s:
        benchlib.TARGET_S = args.target_s
    elif args.quick and "PYMERGE_BENCH_TARGET_S" not in os.environ:
        benchlib.TARGET_S = 0.5
    if args.k:
        benchlib.K_VALUES = tuple(int(v) for v in args.k.split(","))
    sizes = benchlib.bench_sizes()
    cases = benchlib.selected_cases()
    names = args.backends.split(",") if args.backends else list(benchlib.bench_backends())
    bad = [b for b in names if b not in benchlib.bench_backends()]
    if bad:
        p.error(f"backend(s) {bad} not available here (available: {', '.join(benchlib.bench_backends())})")
    if "torch" in names:  # the speed-up's reference runs first
        names.remove("torch")
        names.insert(0, "torch")

    print(f"machine: {benchlib.machine_line()}", flush=True)
    bw = benchlib.copy_bandwidth()
    print(f"copy bandwidth: {bw['copy_gbs']:.2f} GB/s (alloc + copy {bw['alloc_copy_gbs']:.2f} GB/s)", flush=True)

    probe = benchlib.CopyProbe()
    results: list[benchlib.Result] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    for n in sizes:
        inputs = benchlib.Inputs(n, k_max=max(max(benchlib.K_VALUES), 2))
        for case in cases:
            for k in case.ks():
                for backend in names:
                    if not benchlib.runs(case, backend):
                        continue
                    try:
                        fn, first = benchlib.checked_call(case, inputs, k, backend)
                        rounds = benchlib.rounds_for(first)
                        probe.restart()
                        median = benchlib.time_call(fn, rounds, probe)
                    except Exception as exc:  # one broken kernel must not end the whole run
                        errors.append(f"{case.name} {backend} k={k} {benchlib.fmt_count(n)}: {type(exc).__name__}: {exc}")
                        print(f"  ERROR {errors[-1]}", file=sys.stderr, flush=True)
                        continue
                    r = benchlib.Result(case.name, backend, k, n, median, rounds, case.traffic(n, k), probe.gbs())
                    results.append(r)
                    print(f"  {case.name:22s} {backend:6s} k={k if k is not None else '-'} {benchlib.fmt_count(n):>4s} "
                          f"{median * 1e3:10.3f} ms {r.gbs:7.2f} GB/s {r.pct_of_copy:6.1f}% of copy",
                          file=sys.stderr, flush=True)
        del inputs
    elapsed = time.perf_counter() - t0

    missing = benchlib.torch_only_ops(results) if "cpu" in names else []
    header = [
        "# pymerge op throughput",
        "",
        f"- machine: {benchlib.machine_line()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{command}`",
        f"- copy bandwidth (read + write, {bw['bytes'] // 2 // benchlib.MIB} MiB buffer) at the start: {bw['copy_gbs']:.2f} GB/s "
        f"into a preallocated tensor; {bw['alloc_copy_gbs']:.2f} GB/s with torch.empty_like(x).copy_(x). "
        "'copy GB/s' in the tables: the same copy timed before each of the case's rounds, the bound of '% of copy'",
        f"- inputs: bf16 tensors [n / {benchlib.ROW}, {benchlib.ROW}]; GB/s = minimum traffic (bench/benchlib.py) / median; "
        "'vs torch' = torch reference median / this median",
        f"- run time: {elapsed:.0f} s",
    ]
    if missing:
        header.append(f"- ops without a cpu kernel at this time (torch only): {', '.join(missing)}")
    for e in errors:
        header.append(f"- ERROR (not timed): {e}")
    text = "\n".join(header) + "\n\n" + benchlib.markdown_tables(results)
    print()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
