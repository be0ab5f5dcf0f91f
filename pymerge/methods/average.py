"""linear and task_arithmetic: weighted sums (specs/methods.md)."""

from __future__ import annotations

from pymerge import ops
from pymerge.align.apply import average_with_maps
from pymerge.methods.base import MergeMethod


class Linear(MergeMethod):
    name = "linear"
    needs_base = False
    fuses_permutations = True

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

    def merge_aligned(self, name, base, tensors, maps):
        """One permute_average: sum_i w_i pi_i(theta_i), divided by the weights of the models that
        cover each element when normalize is on (the width-merge "keep" rule; off: "shrink")."""
        if all(m is None for ms in maps for m in ms):
            return self.merge(name, base, tensors)
        p = self.tensor_params(name)
        out = average_with_maps(
            tensors,
            [m["weight"] for m in p.per_model],
            maps,
            normalize_coverage=p.options["normalize"],
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
