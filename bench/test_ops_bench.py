"""pytest-benchmark suite of the merge ops: the torch reference against the cpu backend's kernels.

    python -m pytest bench/test_ops_bench.py --benchmark-only -q                         # 1M and 16M elements
    PYMERGE_BENCH_QUICK=1 python -m pytest bench/test_ops_bench.py --benchmark-only -q   # 1M only

Every op of pymerge.ops runs with backend="torch"; it also runs with
backend="cpu" when the cpu backend implements it at run time
(`pymerge.backends.implements("cpu", op)`), so kernels that land are picked up
without touching this file. Inputs are bf16, k = 2, 4, 8 models. Each
benchmark's extra_info holds the minimum traffic in bytes (the table in
bench/benchlib.py), GB/s from the median, the % of the copy bandwidth timed
between its own rounds, and the speed-up over the torch reference.

Environment: PYMERGE_BENCH_QUICK=1 (small sizes only), PYMERGE_BENCH_SIZES=1M,4M,
PYMERGE_BENCH_OPS=ties_merge,slerp (case or op names), PYMERGE_BENCH_TARGET_S
(seconds of timed rounds per benchmark, default 1, 0.5 quick), PYMERGE_BENCH_REPORT=file.md.
"""

from __future__ import annotations

import pytest

import benchlib


def _params():
    params = []
    for n in benchlib.bench_sizes():
        for case in benchlib.selected_cases():
            for k in case.ks():
                for backend in benchlib.bench_backends():  # torch first: its median is the speed-up's reference
                    if benchlib.runs(case, backend):
                        kid = "" if k is None else f"-k{k}"
                        params.append(pytest.param(case, n, k, backend,
                                                   id=f"{case.name}-{benchlib.fmt_count(n)}{kid}-{backend}"))
    return params


@pytest.mark.parametrize(("case", "n", "k", "backend"), _params())
def test_op(benchmark, case, n, k, backend, bench_inputs, copy_bw, copy_probe, bench_results):
    x = bench_inputs(n)
    fn, first_s = benchlib.checked_call(case, x, k, backend)
    rounds = benchlib.rounds_for(first_s)
    benchmark.group = f"{case.name} {benchlib.fmt_count(n)}" + ("" if k is None else f" k={k}")
    copy_probe.restart()
    benchmark.pedantic(fn, setup=copy_probe, rounds=rounds, iterations=1, warmup_rounds=0)  # setup is not timed
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    median = benchmark.stats.stats.median
    result = benchlib.Result(case.name, backend, k, n, median, rounds, case.traffic(n, k), copy_probe.gbs())
    ref = next((r.median_s for r in bench_results
                if r.backend == "torch" and (r.case, r.k, r.n) == (case.name, k, n)), None)
    benchmark.extra_info.update(
        op=case.op,
        case=case.name,
        backend=backend,
        k=k,
        numel=n,
        dtype="bfloat16",
        bytes=result.nbytes,
        gbs=round(result.gbs, 3),
        copy_gbs=round(result.copy_gbs, 3),
        pct_of_copy=round(result.pct_of_copy, 2),
        speedup_vs_torch=None if ref is None else round(ref / median, 3),
    )
    bench_results.append(result)
