"""passthrough: one model copied (dtype converted), or layer slices of models stacked (specs: mergekit's passthrough)."""

from __future__ import annotations

from pymerge.methods.base import MergeMethod


class Passthrough(MergeMethod):
    name = "passthrough"
    needs_base = False

    def merge(self, name, base, tensors):
        # The engine reads a slices config as one composed model (pymerge.io.slices).
        return {name: tensors[0].to(self.out_dtype_of(name))}
