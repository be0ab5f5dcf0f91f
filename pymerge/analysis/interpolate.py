"""The loss/accuracy curve on the straight line between two checkpoints, and its barriers.

A thin layer over `pymerge.align.interpolate` (the curve, B1 and B2 of
specs/alignment.md) and `pymerge.align` (weight matching, permuted state dicts):
it loads the two models from wherever they are, optionally aligns B to A first,
and returns the curve with its barriers.

    B1 = max_α L(α) − ½(L(0) + L(1))
    B2 = max_α [L(α) − ((1 − α) L(0) + α L(1))]   (≥ 0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from pymerge.align.interpolate import InterpolationCurve, interpolation_curve
from pymerge.io import CheckpointReader

__all__ = ["InterpolationResult", "interpolate", "load_state_dict"]


def load_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint path (folder or file), a CheckpointReader, an nn.Module or a mapping."""
    if isinstance(model, torch.nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        return dict(model)
    if isinstance(model, CheckpointReader):
        return {n: model.get(n) for n in model.names()}
    if isinstance(model, (str, os.PathLike)):
        with CheckpointReader(model) as r:
            return {n: r.get(n) for n in r.names()}
    raise TypeError(f"cannot read a model from {type(model).__name__}")


@dataclass
class InterpolationResult:
    """The curve θ(α) = (1 − α) θ_A + α θ_B, its barriers, and the alignment used (if any)."""

    curve: InterpolationCurve
    aligned: bool = False
    perms: dict[str, torch.Tensor] | None = None

    @property
    def alphas(self) -> list[float]:
        return self.curve.alphas

    @property
    def losses(self) -> list[float]:
        return self.curve.losses

    @property
    def accuracies(self) -> list[float] | None:
        return self.curve.accuracies

    @property
    def b1(self) -> float:
        return self.curve.b1

    @property
    def b2(self) -> float:
        return self.curve.b2

    @property
    def midpoint_loss(self) -> float:
        return self.curve.midpoint_loss

    @property
    def midpoint_accuracy(self) -> float | None:
        return self.curve.midpoint_accuracy

    def format(self) -> str:
        acc = self.accuracies
        lines = [f"{'alpha':>6}  {'loss':>10}" + ("  accuracy" if acc is not None else "")]
        for i, a in enumerate(self.alphas):
            lines.append(f"{a:6.3f}  {self.losses[i]:10.5f}" + (f"  {acc[i]:8.4f}" if acc is not None else ""))
        mid_acc = self.midpoint_accuracy
        lines.append(f"barriers ({'after alignment' if self.aligned else 'no alignment'}): B1 = {self.b1:.5f}, "
                     f"B2 = {self.b2:.5f}; midpoint loss {self.midpoint_loss:.5f}"
                     + (f", accuracy {mid_acc:.4f}" if mid_acc is not None else ""))
        return "\n".join(lines)

    __str__ = format


def interpolate(model_a: Any, model_b: Any, eval_fn: Callable[[dict[str, torch.Tensor]], Any],
                alphas: Iterable[float] | int = 21, *, align: bool | str | os.PathLike | Mapping[str, torch.Tensor] = False,
                spec: Any = None, max_sweeps: int = 100, seed: int = 0) -> InterpolationResult:
    """Evaluate `eval_fn` along the line from model A to model B; return the curve and the barriers.

    model_a, model_b: checkpoint paths, CheckpointReaders, nn.Modules or state dicts.
    eval_fn(state_dict): a loss, (loss, accuracy) or {"loss": ..., "accuracy": ...}; for
    models with BatchNorm it should recompute the statistics (`pymerge.align.recompute_batchnorm`).
    alphas: a grid, or the number of evenly spaced points from 0 to 1 (21 by default; must hold 0 and 1
    for the barriers).
    align: False (the naive line); True or "weights" (weight-match B to A first, data-free, with the
    PermutationSpec `spec`, e.g. `pymerge.align.mlp_spec(3)`; without one it is built from model A's
    config.json); a permutation file written by `pymerge.align.save_permutations`; or a dict of
    permutations as returned by weight matching.
    """
    from pymerge.align import permute_state_dict, spec_from_config, weight_matching
    from pymerge.align.apply import load_permutation_file

    sd_a = load_state_dict(model_a)
    sd_b = load_state_dict(model_b)
    perms = None
    if align is not False and align is not None:
        if isinstance(align, (str, os.PathLike)) and align != "weights":
            pf = load_permutation_file(align)
            perms = dict(pf.perms)
            spec = spec if spec is not None else pf.spec
        elif isinstance(align, Mapping):
            perms = {k: torch.as_tensor(v) for k, v in align.items()}
        elif align is True or align == "weights":
            pass
        else:
            raise ValueError(f"align must be False, True, 'weights', a permutation file or a dict, not {align!r}")
        if spec is None:
            config = None
            if isinstance(model_a, (str, os.PathLike)):
                with CheckpointReader(model_a) as r:
                    config = r.config()
            if config is None:
                raise ValueError("alignment needs a PermutationSpec: pass spec= (e.g. pymerge.align.mlp_spec(n_layers))")
            spec = spec_from_config(config)
        if perms is None:
            perms = weight_matching(spec, sd_a, sd_b, max_sweeps=max_sweeps, seed=seed).perms
        sd_b = permute_state_dict(sd_b, spec, perms)
    curve = interpolation_curve(sd_a, sd_b, eval_fn, alphas)
    return InterpolationResult(curve, aligned=perms is not None, perms=perms)
