"""The functional API: one function per merge primitive.

Each op takes torch tensors (the base, a list of model tensors, per-model
coefficients, the method's scalars; see the reference's docstrings, which are
the contract) plus `backend="auto"|"torch"|"cpu"|"cuda"|"triton"`, picks the
implementation for the tensors' device, and returns a new tensor. The backend
that ran is reported by `last_backend()`.
"""

from __future__ import annotations

import functools

import torch

from pymerge import backends
from pymerge.backends import last_backend
from pymerge.ops import reference

OPS = (
    "weighted_sum",
    "ties_merge",
    "ties_sign_sum",
    "ties_merge_model",
    "dare_merge",
    "dare_keep_mask",
    "breadcrumbs_merge",
    "slerp",
    "emr_elect",
    "emr_reconstruct",
    "pack_bits",
    "unpack_bits",
    "pcb_merge",
    "pcb_scores",
    "pcb_merge_with_stats",
    "permute_average",
)

__all__ = list(OPS) + ["last_backend", "reference"]


def _device_type(args, kwargs) -> str:
    if kwargs.get("device") is not None:  # ops that create tensors (dare_keep_mask)
        return torch.device(kwargs["device"]).type
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0].device.type
    return "cpu"


def _make_op(name: str):
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def op(*args, backend: str = "auto", **kwargs):
        _, impl = backends.select(name, backend, _device_type(args, kwargs))
        return impl(*args, **kwargs)

    return op


for _name in OPS:
    globals()[_name] = _make_op(_name)
del _name
