"""linear and task_arithmetic: weighted sums (specs/methods.md)."""

from __future__ import annotations

from pymerge import ops
from pymerge.methods.base import MergeMethod


class Linear(MergeMethod):
    name = "linear"
    needs_base = False

    def merge(self, name, base, tensors):
        p = self.tensor_params(name)
        out = ops.weighted_sum(
            tensors,
            [m["weight"] for m in p.per_model],
            normalize=p.options["normalize"],
            out_dtype=self.out_dtype_of(name),
            backend=self.backend,
        )
        return {name: out}


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"

    def merge(self, name, base, tensors):
        p = self.tensor_params(name)
        out = ops.weighted_sum(
            tensors,
            [m["weight"] for m in p.per_model],
            base=base,
            lam=p.options["lambda"],
            normalize=p.options["normalize"],
            out_dtype=self.out_dtype_of(name),
            backend=self.backend,
        )
        return {name: out}
