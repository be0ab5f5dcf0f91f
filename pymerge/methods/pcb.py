"""pcb: PCB-Merging (Parameter Competition Balancing), model scope (default) or per tensor."""

from __future__ import annotations

import torch

from pymerge import ops
from pymerge.methods.base import MergeMethod, numel
from pymerge.ops.reference._common import task_vectors
from pymerge.ops.reference.pcb import pcb_clip_indices, pcb_score_index
from pymerge.ops.selection import RadixSelect, histogram_op


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
            self._observe_clip(pass_index, base, tensors)
            return
        beta = ops.pcb_scores(base, tensors, self.lo, self.hi, backend=self.backend)
        hist = histogram_op("order_key_histogram", self.backend, beta.device.type)
        for i in range(self.n):
            if hist is None:
                self.scores.update(i, beta[i])
            elif pass_index == 2:
                self.scores.add_histogram(i, hist(beta[i], shift=16))
            else:
                self.scores.add_histogram(i, hist(beta[i], shift=0, prefix=self.scores.prefix(i)), count=beta.shape[1])
            if pass_index == 2 and beta.shape[1]:
                self.score_max[i] = max(self.score_max[i], float(beta[i].max()))

    def _observe_clip(self, pass_index, base, tensors):
        hist = histogram_op("abs_tau_histogram", self.backend, base.device.type)
        if hist is None:
            tau = task_vectors(base, tensors).abs_()
            for i in range(self.n):
                self.clip.update(2 * i, tau[i])
                self.clip.update(2 * i + 1, tau[i])
            return
        # The kernel histograms |tau_i| straight from the inputs; lo and hi share phase 1.
        for i, t in enumerate(tensors):
            lo_s, hi_s = 2 * i, 2 * i + 1
            if pass_index == 0:
                h = hist(base, t, shift=16)
                self.clip.add_histogram(lo_s, h, keys="abs")
                self.clip.add_histogram(hi_s, h, keys="abs")
                continue
            p_lo, p_hi = self.clip.prefix(lo_s, keys="abs"), self.clip.prefix(hi_s, keys="abs")
            h_lo = hist(base, t, shift=0, prefix=p_lo)
            h_hi = h_lo if p_hi == p_lo else hist(base, t, shift=0, prefix=p_hi)
            self.clip.add_histogram(lo_s, h_lo, keys="abs", count=t.numel())
            self.clip.add_histogram(hi_s, h_hi, keys="abs", count=t.numel())

    def reduce_statistics(self, pass_index, reduce):
        (self.clip if pass_index < 2 else self.scores).reduce(reduce)
        if pass_index == 2:
            # fp32 values held exactly as fp64; max is order-free
            self.score_max = reduce(torch.tensor(self.score_max, dtype=torch.float64), "max").tolist()

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
