"""Linear interpolation between two models and the loss barriers along the path.

theta(alpha) = (1 - alpha) theta_A + alpha theta_B on a grid of alphas; the
caller's ``eval_fn(state_dict)`` gives the loss (and accuracy) at each point.

    B1 = max_alpha L(alpha) - (L(0) + L(1)) / 2
    B2 = max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]   (>= 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "alpha_grid",
    "interpolate",
    "barriers",
    "InterpolationCurve",
    "interpolation_curve",
    "mean_stderr",
    "recompute_batchnorm",
]


def alpha_grid(n: int = 21) -> list[float]:
    """n evenly spaced alphas from 0 to 1 inclusive (21 or 25 by convention)."""
    if n < 2:
        raise ValueError("an interpolation grid needs at least 2 points")
    return [i / (n - 1) for i in range(n)]


def interpolate(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * A + alpha * B for floating tensors (computed in fp32 or wider); others from A."""
    if set(sd_a) != set(sd_b):
        diff = sorted(set(sd_a) ^ set(sd_b))
        raise ValueError(f"the state dicts differ in tensor names: {diff[:5]}")
    out = {}
    for name, a in sd_a.items():
        b = sd_b[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        if not a.is_floating_point():
            out[name] = a
            continue
        wide = torch.promote_types(a.dtype, torch.float32)
        out[name] = ((1.0 - alpha) * a.to(wide) + alpha * b.to(wide)).to(a.dtype)
    return out


def barriers(alphas: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """(B1, B2) of a loss curve; alphas must include 0 and 1."""
    alphas, losses = list(alphas), list(losses)
    if len(alphas) != len(losses) or not alphas:
        raise ValueError("alphas and losses must be non-empty and of equal length")
    try:
        l0, l1 = losses[alphas.index(0.0)], losses[alphas.index(1.0)]
    except ValueError:
        raise ValueError("the alpha grid must contain 0 and 1") from None
    b1 = max(losses) - 0.5 * (l0 + l1)
    b2 = max(loss - ((1.0 - a) * l0 + a * l1) for a, loss in zip(alphas, losses))
    return b1, max(b2, 0.0)


@dataclass
class InterpolationCurve:
    alphas: list[float]
    losses: list[float]
    accuracies: list[float] | None = None
    extras: list[dict[str, Any]] = field(default_factory=list)

    @property
    def b1(self) -> float:
        return barriers(self.alphas, self.losses)[0]

    @property
    def b2(self) -> float:
        return barriers(self.alphas, self.losses)[1]

    def _at(self, values, alpha):
        i = min(range(len(self.alphas)), key=lambda k: abs(self.alphas[k] - alpha))
        return values[i]

    @property
    def midpoint_loss(self) -> float:
        return self._at(self.losses, 0.5)

    @property
    def midpoint_accuracy(self) -> float | None:
        return None if self.accuracies is None else self._at(self.accuracies, 0.5)


def _parse_eval(result) -> tuple[float, float | None, dict]:
    if isinstance(result, Mapping):
        extra = dict(result)
        return float(extra.pop("loss")), (None if "accuracy" not in extra else float(extra.pop("accuracy"))), extra
    if isinstance(result, (tuple, list)):
        return float(result[0]), (float(result[1]) if len(result) > 1 else None), {}
    return float(result), None, {}


def interpolation_curve(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                        eval_fn: Callable[[dict[str, torch.Tensor]], Any], alphas: Iterable[float] | int = 21) -> InterpolationCurve:
    """Loss (and accuracy) at each alpha. eval_fn returns a loss, (loss, accuracy) or
    {"loss": ..., "accuracy": ..., ...}; models with BatchNorm should recompute its
    statistics inside eval_fn (see recompute_batchnorm)."""
    alphas = alpha_grid(alphas) if isinstance(alphas, int) else [float(a) for a in alphas]
    losses, accs, extras = [], [], []
    for a in alphas:
        loss, acc, extra = _parse_eval(eval_fn(interpolate(sd_a, sd_b, a)))
        losses.append(loss)
        accs.append(acc)
        extras.append(extra)
    return InterpolationCurve(alphas, losses, None if any(x is None for x in accs) else accs, extras)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) over seed pairs."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, batches: Iterable[Any],
                        forward: Callable[[torch.nn.Module, Any], Any] | None = None) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) on batches."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, (tuple, list)):
                model(batch[0])
            else:
                model(batch)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
