"""pcb: PCB-Merging (Parameter Competition Balancing), model scope (default) or per tensor."""

from __future__ import annotations

import torch

from pymerge import ops
from pymerge.methods.base import MergeMethod, numel
from pymerge.ops.reference._common import task_vectors
from pymerge.ops.reference.pcb import pcb_clip_indices, pcb_score_index
from pymerge.ops.selection import RadixSelect


class Pcb(MergeMethod):
    name = "pcb"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opts = self.config.parameters
        self.scope = opts.get("scope", "model")
        self.d = sum(numel(s) for s in self.merged.values())
        if self.scope == "model" and self.d:
            self.n = len(self.config.models)
            first = self.tensor_params(next(iter(self.merged))).options
            lo, hi = pcb_clip_indices(self.d, first["clip_ratio"])
            # streams 2i and 2i+1: the lo and hi clip bounds of model i
            self.clip = RadixSelect(2 * self.n, [lo, hi] * self.n)
            self.scores = RadixSelect(self.n, [pcb_score_index(self.d, first["density"])] * self.n)
            self.score_max = [float("-inf")] * self.n

    @property
    def passes(self) -> int:
        return 4 if self.scope == "model" and self.d else 0

    def observe(self, pass_index, name, base, tensors):
        if pass_index < 2:
            tau = task_vectors(base, tensors).abs_()
            for i in range(self.n):
                self.clip.update(2 * i, tau[i])
                self.clip.update(2 * i + 1, tau[i])
            return
        beta = ops.pcb_scores(base, tensors, self.lo, self.hi, backend=self.backend)
        for i in range(self.n):
            self.scores.update(i, beta[i])
            if pass_index == 2 and beta.shape[1]:
                self.score_max[i] = max(self.score_max[i], float(beta[i].max()))

    def end_pass(self, pass_index):
        (self.clip if pass_index < 2 else self.scores).next_phase()
        if pass_index == 1:
            v = self.clip.values()
            self.lo = torch.tensor(v[0::2], dtype=torch.float32)
            self.hi = torch.tensor(v[1::2], dtype=torch.float32)
        elif pass_index == 3:
            self.q = torch.tensor(self.scores.values(), dtype=torch.float32)
            self.m = torch.tensor(self.score_max, dtype=torch.float32)

    def merge(self, name, base, tensors):
        p = self.tensor_params(name).options
        common = dict(lam=p["lambda"], lambdas=p.get("lambdas"), out_dtype=self.out_dtype_of(name), backend=self.backend)
        if self.scope == "model":
            out = ops.pcb_merge_with_stats(base, tensors, self.lo, self.hi, self.q, self.m, **common)
        else:
            out = ops.pcb_merge(base, tensors, density=p["density"], clip_ratio=p["clip_ratio"], **common)
        return {name: out}
