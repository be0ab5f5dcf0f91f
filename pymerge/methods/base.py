"""The interface every merge method implements.

A method turns the inputs of one tensor name (the base tensor, one tensor per
merged model, the parameters resolved for that name) into its outputs by
calling `pymerge.ops`. Methods with model-scope statistics declare passes: the
engine streams every merged tensor through `observe` once per pass before the
merge pass.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class MergeMethod:
    name: ClassVar[str]
    needs_base: ClassVar[bool] = True
    # True when `merge` must see every tensor (it accumulates statistics), even
    # the ones a resumed run does not write again.
    merge_sees_all: ClassVar[bool] = False
    # Name under which tensors that are not merged (non-float ones) are written.
    copy_prefix: ClassVar[str] = ""
    # True to keep, per model, float tensors whose shapes differ between models
    # (task heads) instead of rejecting them.
    keeps_task_specific: ClassVar[bool] = False
    # True when the method merges permuted models itself through index maps (merge_aligned),
    # in one fused pass, instead of seeing each tensor already re-indexed.
    fuses_permutations: ClassVar[bool] = False

    def __init__(self, config, merged: dict[str, tuple[int, ...]], tensor_params, out_dtype_of):
        """config: MergeConfig; merged: name -> shape of every merged tensor, in order;
        tensor_params(name) -> TensorParams; out_dtype_of(name) -> torch.dtype."""
        self.config = config
        self.merged = merged
        self.tensor_params = tensor_params
        self.out_dtype_of = out_dtype_of
        self.backend = config.backend

    def inputs_planned(self, order: list[str], copied: list[str], task_specific: list[str]) -> None:
        """Told, before any pass, how the engine sorted the input tensor names."""

    # --- statistics passes (model scope) -------------------------------------------------
    @property
    def passes(self) -> int:
        return 0

    def observe(self, pass_index: int, name: str, base, tensors: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        pass

    # --- distributed runs: each rank saw a share of the tensors ----------------------------
    def reduce_statistics(self, pass_index: int, reduce) -> None:
        """Combine this pass's statistics over all ranks, before end_pass.

        reduce(tensor, op="sum" | "max") returns the element-wise reduction over ranks. The
        result must equal what one process streaming every tensor would hold, bit for bit:
        reduce integer counts, or values with one contributing rank per slot.
        """
        if self.passes:
            raise NotImplementedError(f"{self.name}: statistics passes need reduce_statistics for a distributed run")

    def reduce_merge_statistics(self, reduce, owned: list[str]) -> None:
        """Combine statistics `merge` gathered (owned: the names whose values this rank contributes)."""

    # --- the merge pass -----------------------------------------------------------------
    def output_plan(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The output tensors this method writes for one merged input tensor, in order."""
        return [(name, shape, self.out_dtype_of(name))]

    def merge(self, name: str, base, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge_aligned(self, name: str, base, tensors: list[torch.Tensor], maps) -> dict[str, torch.Tensor]:
        """merge() of models given in their own coordinates: maps[i] holds one index map (or None)
        per axis of tensors[i] into the output's coordinates, -1 for "no unit here"."""
        raise NotImplementedError

    def extra_files(self) -> dict[str, bytes]:
        """Files written beside the weights when the merge completes."""
        return {}


def model_constant(method: MergeMethod, key: str) -> list[float]:
    """A per-model parameter that a model-scope statistic needs as one value per model."""
    values = None
    for name in method.merged:
        per = [p[key] for p in method.tensor_params(name).per_model]
        if values is None:
            values = per
        elif per != values:
            from pymerge.errors import ConfigError

            raise ConfigError(
                f"parameters.{key}: scope: model needs one value per model, but it varies by tensor "
                f"({values} vs {per} at {name})"
            )
    return values or []


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
