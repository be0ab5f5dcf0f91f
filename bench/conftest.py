"""Fixtures of the op benchmarks: inputs per size, the copy bandwidth (at the start, and the probe timed
before each round), the results table.

Only loaded when bench/ is collected explicitly (pyproject's testpaths is tests/):

    python -m pytest bench/test_ops_bench.py --benchmark-only -q

At the end of the session a markdown table per op is printed (and written to
the file PYMERGE_BENCH_REPORT names, if set).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

_RESULTS: list[benchlib.Result] = []
_STATE: dict = {}


@pytest.fixture(scope="session")
def copy_bw() -> dict[str, float]:
    """The machine's copy bandwidth at the start of the session (the header's figure)."""
    if "copy" not in _STATE:
        _STATE["copy"] = benchlib.copy_bandwidth()
    return _STATE["copy"]


@pytest.fixture(scope="session")
def copy_probe() -> benchlib.CopyProbe:
    """The copy timed before each benchmark round: the bound of each case's "% of copy"."""
    return benchlib.CopyProbe()


@pytest.fixture(scope="session")
def bench_inputs():
    """inputs(n): the bf16 base and fine-tunes of n elements, built once per size."""
    cache: dict[int, benchlib.Inputs] = {}

    def get(n: int) -> benchlib.Inputs:
        if n not in cache:
            cache.clear()  # one size at a time: the parametrization runs sizes in order
            cache[n] = benchlib.Inputs(n)
        return cache[n]

    return get


@pytest.fixture(scope="session")
def bench_results() -> list[benchlib.Result]:
    return _RESULTS


def pytest_report_header(config):
    return [f"pymerge bench: {benchlib.machine_line()}",
            f"pymerge bench: sizes {', '.join(benchlib.fmt_count(n) for n in benchlib.bench_sizes())}, "
            f"k {benchlib.K_VALUES}, backends {', '.join(benchlib.bench_backends())}, "
            f"quick={benchlib.quick_mode()}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS or "copy" not in _STATE:
        return
    bw = _STATE["copy"]
    missing = benchlib.torch_only_ops(_RESULTS) if "cpu" in benchlib.bench_backends() else []
    lines = [
        f"machine: {benchlib.machine_line()}",
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"command: {benchlib.command_line(sys.argv)}",
        f"copy bandwidth (read + write, {bw['bytes'] // 2 // benchlib.MIB} MiB buffer) at the start: {bw['copy_gbs']:.2f} GB/s "
        f"into a preallocated tensor, {bw['alloc_copy_gbs']:.2f} GB/s with torch.empty_like(x).copy_(x); "
        "'copy GB/s' in the tables: the same copy timed before each of the case's rounds, the bound of '% of copy'",
        f"inputs: bf16, tensors [n / {benchlib.ROW}, {benchlib.ROW}]; GB/s from the median and the op's minimum traffic "
        "(bench/benchlib.py)",
    ]
    if missing:
        lines.append(f"ops without a cpu kernel (torch only): {', '.join(missing)}")
    text = "\n".join(lines) + "\n\n" + benchlib.markdown_tables(_RESULTS)
    terminalreporter.write_sep("=", "pymerge op throughput")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    out = __import__("os").environ.get("PYMERGE_BENCH_REPORT")
    if out:
        Path(out).write_text(text)
        terminalreporter.write_line(f"written to {out}")
