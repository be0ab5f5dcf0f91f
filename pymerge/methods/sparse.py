"""dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties: sparsified task vectors (specs/methods.md)."""

from __future__ import annotations

from pymerge import ops
from pymerge.methods.base import MergeMethod

_RESCALE = {True: "l1", False: "none", "inverse_density": "inverse_density"}


class _Sparse(MergeMethod):
    combine: str

    def _common(self, name):
        p = self.tensor_params(name)
        kwargs = dict(
            lam=p.options["lambda"],
            normalize=p.options["normalize"],
            combine=self.combine,
            out_dtype=self.out_dtype_of(name),
            backend=self.backend,
        )
        if self.combine == "ties":
            kwargs["consensus"] = p.options["consensus"]
        return p, kwargs


class _Dare(_Sparse):
    def merge(self, name, base, tensors):
        p, kwargs = self._common(name)
        out = ops.dare_merge(
            base,
            tensors,
            [m["weight"] for m in p.per_model],
            [m["density"] for m in p.per_model],
            name=name,
            seed=self.config.seed,
            rescale=_RESCALE[p.options["rescale"]],
            **kwargs,
        )
        return {name: out}


class DareLinear(_Dare):
    name = "dare_linear"
    combine = "linear"


class DareTies(_Dare):
    name = "dare_ties"
    combine = "ties"


class _Breadcrumbs(_Sparse):
    def merge(self, name, base, tensors):
        p, kwargs = self._common(name)
        out = ops.breadcrumbs_merge(
            base,
            tensors,
            [m["weight"] for m in p.per_model],
            [m["density"] for m in p.per_model],
            [m["gamma"] for m in p.per_model],
            **kwargs,
        )
        return {name: out}


class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    combine = "linear"


class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    combine = "ties"
