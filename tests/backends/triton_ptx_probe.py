"""Compile the Triton kernels for a GPU target without a GPU and print their PTX opcodes.

Run as a script by test_triton_ptx.py, without TRITON_INTERPRET. Every kernel is
compiled exactly as its launch wrapper would launch it (same arguments, so the same
specializations, and the wrapper's launch options, enable_fp_fusion included):
JITFunction.run is replaced by a compile, so nothing needs a device. Prints one JSON
object {kernel name: sorted opcodes}, or {"skip": reason}.
"""

from __future__ import annotations

import json
import re
import sys

import torch

try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime import jit as jit_mod

    TARGET = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
    BACKEND = make_backend(TARGET)
except Exception as exc:  # no CUDA backend in this triton build
    print(json.dumps({"skip": f"cannot target CUDA: {exc!r}"}))
    sys.exit(0)

found: dict[str, set[str]] = {}


def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    # the first steps of JITFunction.run, then a compile for TARGET instead of the launch
    kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = jit_mod.create_function_from_signature(self.signature, self.params, BACKEND)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, spec, options)
    ptx = compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__).asm["ptx"]
    found.setdefault(self.__name__, set()).update(line.split()[0] for line in ptx.splitlines() if re.match(r"\s+[a-z]", line))


jit_mod.JITFunction.run = compile_instead_of_launch

import pymerge.backends.triton._lib as lib  # noqa: E402

lib.interpreted = lambda: True  # let the ops take CPU tensors: nothing is launched
from pymerge.backends import triton as tb  # noqa: E402

bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32


def z(shape, dtype=f32):
    return torch.zeros(shape, dtype=dtype)


base = z(3000, bf)
xs = [z(3000, f32), z(3000, bf), z(3000, f16)]
tb.weighted_sum(xs, [0.5, 0.25, 1.0], base=base, out_dtype=bf)
tb.weighted_sum([z(1, f16)], out_dtype=f16)  # a size of 1 is specialized as a constant
tb.dare_merge(base, xs, None, 0.5, name="w", combine="ties", normalize=True, out_dtype=f16)
tb.dare_merge(base, xs, None, 0.5, name="w", combine="linear", rescale="l1", out_dtype=f32)
tb.dare_merge(z(1), [z(1)], None, 0.5, name="w", combine="ties", consensus="count")
tb.dare_keep_mask(1, name="w", seed=0, model_index=0, density=0.5)
r = tb.emr_elect(base, xs, out_dtype=bf)
tb.emr_elect(z(1), [z(1)], zero_sign="zero")
tb.emr_reconstruct(base, r.u, r.masks[0], 0.5, out_dtype=f16)
W = [z((40, 300)), z((50, 310), bf)]
tb.permute_average(W, [0.5, 0.5], [None, torch.arange(40)], [torch.arange(300).int(), torch.arange(300)], normalize_coverage=True)
tb.permute_average([z(7, f16), z(9, bf)], [0.5, 0.5], [None, torch.arange(7)], out_dtype=bf)
tb.slerp(z((33, 70), bf), z((33, 70), f16), 0.3, out_dtype=f16)
tb.slerp(z(1), z(1), 0.3)
tb.slerp(z((2, 5000)), z((2, 5000)), 0.3, out_dtype=bf)
# selection, ties, breadcrumbs, pcb, histograms. Nothing runs here, so the histograms stay
# empty: the trims' launches are called with hand-made rules instead of top_k_trims.
kern = lib.kernels()
kh, kt = kern.histogram, kern.ties
tb.abs_tau_histogram(base, xs[2], shift=16)
tb.abs_tau_histogram(base, xs[0], shift=0, prefix=7)
tb.order_key_histogram(xs[1], shift=16)
tb.order_key_histogram(xs[2], shift=0, prefix=7)
high = kh.high_histograms(base, xs, kh.KEY_MAG)
kh.keys_from_high(base, xs, kh.KEY_MAG, high, torch.zeros((3, 2), dtype=torch.int64))
kh.equal_offsets(base, xs[:2], torch.zeros(2, dtype=torch.int32))
for split, drop, ties, normalize in ((True, False, True, True), (False, True, True, False), (True, True, False, False)):
    T = 6 if drop else 3
    nb = kh.n_programs(3000, kh.BLOCK_SIZE)
    trims = kh.Trims(
        thr=torch.zeros(T, dtype=torch.int32),
        take=torch.zeros(T, dtype=torch.int64),
        max_key=torch.zeros(T, dtype=torch.int32),
        offsets=torch.zeros((T, nb if split else 1), dtype=torch.int64),
        split=split,
        n_blocks=nb,
    )
    kw = dict(drop=drop, ties=ties, count_consensus=not normalize, normalize=normalize)
    kt.trim_merge(z(3000, f16).view(-1), base, xs, trims, z(3), 0.5, **kw)
tb.ties_sign_sum(base, xs, [0.1, 0.2, 0.3])
tb.ties_merge_model(base, xs, [0.1, 0.2, 0.3], -1, merge="dis-mean", out_dtype=bf)
tb.ties_merge_model(z(1), [z(1)], [0.1], 1, merge="dis-sum")
tb.pcb_scores(base, xs, [0.0] * 3, [1.0] * 3)
tb.pcb_merge_with_stats(base, xs, [0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3, lambdas=[0.5, 1.0, 2.0], out_dtype=f16)
tb.pcb_merge(base, xs, density=0.2, clip_ratio=0.01)
print(json.dumps({name: sorted(ops) for name, ops in found.items()}))
