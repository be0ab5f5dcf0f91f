"""The Triton kernels compiled for a GPU (no GPU needed): fp32 math stays unfused and exact.

The interpreter cannot show what the GPU compiler does with the kernels, so this
compiles each one for sm_90 as its launch wrapper would launch it and reads the PTX:
every fp32/fp64 add, sub, mul and div carries an explicit .rn (PTX never contracts
those into an FMA), and nothing approximate or flush-to-zero appears.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

KERNELS = {
    "_weighted_sum_kernel",
    "_dare_keep_kernel",
    "_dare_l1_partials_kernel",
    "_dare_merge_kernel",
    "_emr_elect_kernel",
    "_emr_reconstruct_kernel",
    "_permute_average_kernel",
    "_slerp_sums_kernel",
    "_slerp_combine_kernel",
    "_sum_rows_kernel",
    "_digit_hist_kernel",
    "_equal_counts_kernel",
    "_trim_merge_kernel",
    "_ties_model_kernel",
    "_pcb_kernel",
}


@pytest.fixture(scope="module")
def opcodes():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    probe = Path(__file__).with_name("triton_ptx_probe.py")
    proc = subprocess.run([sys.executable, str(probe), "90"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def test_every_kernel_compiles_for_sm90(opcodes):
    assert set(opcodes) == KERNELS


def test_no_contraction_approximation_or_ftz(opcodes):
    for kernel, ops in opcodes.items():
        for op in ops:
            assert not op.startswith("fma"), f"{kernel}: {op}"
            assert not re.match(r"mad\S*\.f(32|64)", op), f"{kernel}: {op}"
            assert ".approx" not in op and ".ftz" not in op and ".full" not in op, f"{kernel}: {op}"
            assert not re.match(r"(rcp|rsqrt|sqrt|ex2|lg2|sin|cos)\.", op), f"{kernel}: {op}"
            assert not re.match(r"cvt\.r[zmp]", op), f"{kernel}: {op}"
            if re.match(r"(add|sub|mul|div)\.f(32|64)$", op):
                pytest.fail(f"{kernel}: {op} without an explicit rounding mode may be contracted")


def test_fp32_arithmetic_is_explicitly_rounded(opcodes):
    ops = set(opcodes["_weighted_sum_kernel"])
    assert {"sub.rn.f32", "mul.rn.f32", "add.rn.f32"} <= ops
    assert "div.rn.f32" in opcodes["_dare_merge_kernel"] and "div.rn.f32" in opcodes["_permute_average_kernel"]


def test_pcb_exp_and_tanh_are_unfused_fp64(opcodes):
    # exp / tanh: fp64 adds, multiplies and one IEEE division, rounded once to fp32 (as the CPU backend)
    ops = set(opcodes["_pcb_kernel"])
    assert {"mul.rn.f64", "add.rn.f64", "div.rn.f64", "cvt.rn.f32.f64"} <= ops
    assert "div.rn.f32" in opcodes["_trim_merge_kernel"] and "div.rn.f32" in opcodes["_ties_model_kernel"]
