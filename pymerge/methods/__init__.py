"""Merge methods, one file per family, registered by their config name."""

from __future__ import annotations

from pymerge.methods.average import Linear, TaskArithmetic
from pymerge.methods.base import MergeMethod
from pymerge.methods.emr import Emr
from pymerge.methods.passthrough import Passthrough
from pymerge.methods.pcb import Pcb
from pymerge.methods.slerp import Slerp
from pymerge.methods.sparse import Breadcrumbs, BreadcrumbsTies, DareLinear, DareTies
from pymerge.methods.ties import Ties

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m
    for m in (Linear, TaskArithmetic, Ties, DareLinear, DareTies, Breadcrumbs, BreadcrumbsTies, Slerp, Emr, Pcb, Passthrough)
}


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None
