"""emr: EMR-Merging (Elect, Mask & Rescale). Writes a folder that reconstructs every task.

Output tensors per merged name: `base:<name>` (theta_0), `u:<name>` (the unified task
vector) and `masks:<name>` (int32 [N, ceil(numel/32)]: one bit-plane per task).
Tensors copied as they are get `base:<name>`; task-specific tensors (shapes that
differ between models, e.g. heads) get `task<i>:<name>`. `emr.json` holds the
rescalers and the layout; `pymerge.emr` reads it back.
"""

from __future__ import annotations

import json

import torch

from pymerge import ops
from pymerge.methods.base import MergeMethod, numel
from pymerge.ops.reference.emr import emr_rescalers

EMR_FORMAT = "pymerge-emr"
EMR_VERSION = 1


def words(n: int) -> int:
    return (n + 31) // 32


class Emr(MergeMethod):
    name = "emr"
    merge_sees_all = True
    copy_prefix = "base:"
    keeps_task_specific = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opts = self.config.parameters
        self.zero_sign = opts.get("zero_sign", "neg")
        self.rescale_scope = opts.get("rescale_scope", "tensor_mean_sum")
        self.sums: dict[str, tuple] = {}
        self.layout: dict[str, list[str]] = {}

    def inputs_planned(self, order, copied, task_specific):
        self.layout = {"order": list(order), "merged": list(self.merged), "copied": list(copied),
                       "task_specific": list(task_specific)}

    def output_plan(self, name, shape):
        n = len(self.config.models)
        count = 1
        for s in shape:
            count *= s
        return [
            (f"base:{name}", shape, self.out_dtype_of(name)),
            (f"u:{name}", shape, self.out_dtype_of(name)),
            (f"masks:{name}", (n, words(count)), torch.int32),
        ]

    def merge(self, name, base, tensors):
        od = self.out_dtype_of(name)
        e = ops.emr_elect(base, tensors, zero_sign=self.zero_sign, out_dtype=od, backend=self.backend)
        self.sums[name] = (e.abs_tau_sum, e.abs_masked_u_sum, e.numel)
        return {f"base:{name}": base.to(od), f"u:{name}": e.u, f"masks:{name}": e.masks}

    def reduce_merge_statistics(self, reduce, owned):
        # One contributing rank per row, so the sums arrive exactly as computed.
        n = len(self.config.models)
        names = list(self.merged)
        rows = torch.zeros(len(names), 2 * n, dtype=torch.float64)
        mine = set(owned)
        for k, name in enumerate(names):
            if name in mine:
                rows[k, :n] = torch.as_tensor(self.sums[name][0], dtype=torch.float64)
                rows[k, n:] = torch.as_tensor(self.sums[name][1], dtype=torch.float64)
        rows = reduce(rows)
        for k, name in enumerate(names):
            self.sums[name] = (rows[k, :n], rows[k, n:], numel(self.merged[name]))

    def lambdas(self) -> list[float]:
        stats = [self.sums[n] for n in self.merged]
        return emr_rescalers(
            [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats], scope=self.rescale_scope
        )

    def extra_files(self):
        meta = {
            "format": EMR_FORMAT,
            "version": EMR_VERSION,
            "tasks": [m.model for m in self.config.models],
            "lambdas": self.lambdas() if self.merged else [1.0] * len(self.config.models),
            "zero_sign": self.zero_sign,
            "rescale_scope": self.rescale_scope,
            **self.layout,
        }
        return {"emr.json": json.dumps(meta, indent=2).encode()}
