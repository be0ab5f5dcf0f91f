"""slerp: spherical interpolation between the base (A) and one other model (B)."""

from __future__ import annotations

from pymerge import ops
from pymerge.methods.base import MergeMethod


class Slerp(MergeMethod):
    name = "slerp"

    def merge(self, name, base, tensors):
        t = self.tensor_params(name).options["t"]
        out = ops.slerp(base, tensors[0], t, out_dtype=self.out_dtype_of(name), backend=self.backend)
        return {name: out}
