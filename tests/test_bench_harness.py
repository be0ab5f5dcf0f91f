"""The op benchmark harness (bench/): its figures come from what it timed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

import benchlib  # noqa: E402
import throughput  # noqa: E402

# benchlib chooses torch's OpenMP wait policy for the benchmark scripts; the test
# session (and the processes it starts) keep their own.
if _WAIT_POLICY is None:
    os.environ.pop("OMP_WAIT_POLICY", None)


def test_copy_probe_runs_once_before_each_round():
    probe = benchlib.CopyProbe(nbytes=1 << 20)
    seen = []
    benchlib.time_call(lambda: seen.append(len(probe.times)), 5, probe)
    assert seen == [1, 2, 3, 4, 5]
    assert probe.gbs() > 0
    probe.restart()
    with pytest.raises(RuntimeError, match="no copy timed"):
        probe.gbs()


def test_percent_of_copy_is_taken_against_the_cases_own_copy_bandwidth():
    a = benchlib.Result("weighted_sum", "cpu", 2, 1024, 1e-3, 3, 10**6, copy_gbs=2.0)
    b = benchlib.Result("weighted_sum", "cpu", 4, 1024, 1e-3, 3, 10**6, copy_gbs=4.0)
    assert a.gbs == pytest.approx(1.0) and a.pct_of_copy == pytest.approx(50.0)
    table = benchlib.markdown_tables([a, b])
    assert "| cpu | 2 | 1K | 1.000 | 3 | 1.00 | 2.0 | 50.0% | - |" in table
    assert "| cpu | 4 | 1K | 1.000 | 3 | 1.00 | 4.0 | 25.0% | - |" in table


def test_throughput_script_writes_its_table(tmp_path, monkeypatch):
    for var in ("PYMERGE_BENCH_SIZES", "PYMERGE_BENCH_OPS", "PYMERGE_BENCH_QUICK"):
        monkeypatch.setenv(var, "")  # restored (unset) afterwards; the script sets them
    monkeypatch.setattr(benchlib, "TARGET_S", benchlib.TARGET_S)
    monkeypatch.setattr(benchlib, "K_VALUES", benchlib.K_VALUES)
    out = tmp_path / "table.md"
    rc = throughput.main(["--sizes", "1K", "--k", "2", "--ops", "weighted_sum", "--target-s", "0.01",
                          "--out", str(out)])
    text = out.read_text()
    assert rc == 0
    assert "### weighted_sum" in text and "| copy GB/s | % of copy |" in text
    # "weighted_sum" names an op: both of its cases (with and without a base) ran, once per backend
    rows = [line for line in text.splitlines() if line.startswith(("| torch | 2 | 1K |", "| cpu | 2 | 1K |"))]
    assert len(rows) == 2 * len(benchlib.bench_backends())
