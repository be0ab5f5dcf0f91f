"""Plumbing shared by the cpu ties / dare / breadcrumbs op modules: one tensor's buffers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pymerge.backends.cpu._lib import check_cpu, tag


@dataclass
class Buffers:
    """Contiguous views of the base and the model tensors, with the kernel arguments.

    Holds the tensors, so the addresses stay valid while the object lives.
    """

    base: torch.Tensor
    models: list[torch.Tensor]
    base_tag: int
    tags: list[int]

    @property
    def base_ptr(self) -> int:
        return self.base.data_ptr()

    @property
    def ptrs(self) -> list[int]:
        return [t.data_ptr() for t in self.models]

    @property
    def numel(self) -> int:
        return self.base.numel()

    def args(self) -> tuple:
        """(in_ptrs, in_dtypes, base_ptr, base_dtype, numel), the kernels' input arguments."""
        return self.ptrs, self.tags, self.base_ptr, self.base_tag, self.numel


def buffers(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Buffers:
    """Check that every tensor is a CPU tensor of a kernel dtype; make them contiguous.

    Shapes are checked by the caller (the reference's check_inputs).
    """
    check_cpu(base, "base")
    for i, t in enumerate(tensors):
        check_cpu(t, f"model {i}")
    tags = [tag(t, f"model {i}") for i, t in enumerate(tensors)]
    base_tag = tag(base, "base")
    return Buffers(base.detach().contiguous(), [t.detach().contiguous() for t in tensors], base_tag, tags)
