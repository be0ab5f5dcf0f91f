"""ties: TIES-Merging, per tensor (default) or with model-scope thresholds (specs/methods.md)."""

from __future__ import annotations

import torch

from pymerge import ops
from pymerge.errors import ConfigError
from pymerge.methods.base import MergeMethod, model_constant, numel
from pymerge.ops.reference._common import task_vectors
from pymerge.ops.selection import RadixSelect, histogram_op


class Ties(MergeMethod):
    name = "ties"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scope = self.config.parameters.get("scope", "tensor")
        if self.scope == "model" and self.config.parameters.get("trim_ties", "inclusive") != "inclusive":
            raise ConfigError("trim_ties: scope: model keeps every |tau| >= the threshold; only 'inclusive' applies")
        if self.scope == "model" and self.merged:
            if any(w != 1.0 for w in model_constant(self, "weight")):
                raise ConfigError("weight: ties with scope: model does not weight the models (the TIES paper's form)")
            self._init_model_scope()

    # --- model scope: per-model magnitude thresholds, then the whole model's fallback sign ---
    def _init_model_scope(self):
        densities = model_constant(self, "density")
        d = sum(numel(s) for s in self.merged.values())
        self.n = len(densities)
        self.thresholds = [0.0] * self.n
        # keep |tau| >= the (d - int(d * density))-th smallest; density >= 1 keeps everything
        self.ranks = {i: d - int(d * rho) - 1 for i, rho in enumerate(densities) if d and rho < 1.0}
        self.select = RadixSelect(len(self.ranks), list(self.ranks.values())) if self.ranks else None
        self.sign_total = 0
        self.fallback_sign = 0

    @property
    def passes(self) -> int:
        return 3 if self.scope == "model" else 0

    def observe(self, pass_index, name, base, tensors):
        if pass_index < 2:
            if self.select is None:
                return
            hist = histogram_op("abs_tau_histogram", self.backend, base.device.type)
            if hist is None:
                tau = task_vectors(base, tensors).abs_()
                for stream, i in enumerate(self.ranks):
                    self.select.update(stream, tau[i])
                return
            for stream, i in enumerate(self.ranks):
                if pass_index == 0:
                    self.select.add_histogram(stream, hist(base, tensors[i], shift=16), keys="abs")
                else:
                    h = hist(base, tensors[i], shift=0, prefix=self.select.prefix(stream, keys="abs"))
                    self.select.add_histogram(stream, h, keys="abs", count=tensors[i].numel())
        else:
            self.sign_total += int(ops.ties_sign_sum(base, tensors, self.thresholds, backend=self.backend))

    def reduce_statistics(self, pass_index, reduce):
        if pass_index < 2:
            if self.select is not None:
                self.select.reduce(reduce)
        else:
            self.sign_total = int(reduce(torch.tensor([self.sign_total], dtype=torch.int64))[0])

    def end_pass(self, pass_index):
        if pass_index < 2 and self.select is not None:
            self.select.next_phase()
        if pass_index == 1 and self.select is not None:
            for stream, i in enumerate(self.ranks):
                self.thresholds[i] = self.select.values()[stream]
        elif pass_index == 2:
            self.fallback_sign = (self.sign_total > 0) - (self.sign_total < 0)

    def merge(self, name, base, tensors):
        p = self.tensor_params(name)
        if self.scope == "model":
            out = ops.ties_merge_model(
                base,
                tensors,
                self.thresholds,
                self.fallback_sign,
                lam=p.options["lambda"],
                merge=p.options["merge"],
                out_dtype=self.out_dtype_of(name),
                backend=self.backend,
            )
        else:
            out = ops.ties_merge(
                base,
                tensors,
                [m["weight"] for m in p.per_model],
                [m["density"] for m in p.per_model],
                lam=p.options["lambda"],
                normalize=p.options["normalize"],
                consensus=p.options["consensus"],
                trim_ties=p.options["trim_ties"],
                out_dtype=self.out_dtype_of(name),
                backend=self.backend,
            )
        return {name: out}
