"""Heterogeneous widths (Model Assembly Learning): partial maps, width merges, exact zero-padding.

A donor of another width maps onto the base through *partial maps*: int arrays
of the base's length where -1 means "no donor unit here" (read as zero). A
rectangular LAP selects base-many donor units from a wider donor, or leaves
base units uncovered with a narrower one. Merge rules:

    shrink: W' = (1 - lam) W + lam V~             (uncovered units shrink)
    keep:   W' = W + lam M * (V~ - W)             (M marks covered entries)

both one ``permute_average`` per tensor (``keep`` is its coverage-normalised
form with coefficients 1 - lam, lam). Zero-padding an MLP's width or a
block's number of heads is exact: the new units' outgoing weights are zero.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from pymerge.align.apply import aligned_average, take
from pymerge.align.matching import MatchResult, lap, weight_matching
from pymerge.align.spec import HeadGroup, PermutationSpec, head_map

__all__ = [
    "partial_assignment",
    "infer_heads",
    "renamed",
    "match_widths",
    "merge_widths",
    "pad_width",
    "pad_heads",
]


def partial_assignment(cost) -> torch.Tensor:
    """Rectangular LAP on a [base units, donor units] score: base unit i -> donor unit or -1."""
    return torch.from_numpy(lap(torch.as_tensor(cost).detach().cpu().double().numpy()))


def infer_heads(spec: PermutationSpec, shapes: Mapping[str, Sequence[int]]) -> dict[str, HeadGroup]:
    """Head groups of a model with the spec's head_dim and group size but its own head counts."""
    out = {}
    for g, hg in spec.heads.items():
        dh, gs = hg.head_dim, hg.group_size
        for t, ax, role in spec.group_axes[g]:
            if t not in shapes:
                continue
            n = shapes[t][ax]
            units = {"q": gs, "o": gs, "k": 1, "v": 1, "qkv": gs + 2}[role] * dh
            if n % units:
                raise ValueError(f"{t} axis {ax} ({role}) has size {n}, not a multiple of {units} "
                                 f"(head_dim {dh}, group size {gs})")
            out[g] = hg.resized(n // units)
            break
    return out


class renamed:
    """A model seen under other tensor names, e.g. a donor layer taken from another depth.

    ``rename``: donor name -> name in the output's coordinates (a mapping, where
    unmapped names pass through, or a function returning None to drop a tensor).
    """

    def __init__(self, src: Any, rename: Mapping[str, str | None] | Callable[[str], str | None]):
        self.src = src
        self._reader = hasattr(src, "names") and callable(src.names) and not isinstance(src, Mapping)
        fn = rename if callable(rename) else (lambda n, m=dict(rename): m.get(n, n))
        self._donor: dict[str, str] = {}
        for n in (src.names() if self._reader else list(src)):
            new = fn(n)
            if new is None:
                continue
            if new in self._donor:
                raise ValueError(f"donor tensors {self._donor[new]!r} and {n!r} both renamed to {new!r}")
            self._donor[new] = n

    def names(self) -> list[str]:
        return list(self._donor)

    def shape(self, name: str) -> tuple[int, ...]:
        d = self._donor[name]
        return tuple(self.src.shape(d)) if self._reader else tuple(self.src[d].shape)

    def get(self, name: str) -> torch.Tensor:
        d = self._donor[name]
        return self.src.get(d) if self._reader else self.src[d]


def _shapes(src: Any) -> dict[str, tuple[int, ...]]:
    if hasattr(src, "shape") and hasattr(src, "names") and not isinstance(src, Mapping):
        return {n: tuple(src.shape(n)) for n in src.names()}
    return {n: tuple(t.shape) for n, t in src.items()}


def match_widths(spec: PermutationSpec, base: Any, donor: Any, **options: Any) -> tuple[MatchResult, dict[str, HeadGroup]]:
    """Partial maps of a donor of other widths onto the base (weight matching, rectangular LAPs).

    Both sides' maps are unknown, so the in- and out-assignments alternate
    (block coordinate ascent, monotone). Returns (result, donor head groups).
    """
    src_heads = infer_heads(spec, _shapes(donor))
    return weight_matching(spec, base, donor, src_heads=src_heads, **options), src_heads


def merge_widths(base: Any, donor: Any, perms: Mapping[str, torch.Tensor], lam: float, *, spec: PermutationSpec,
                 uncovered: str = "shrink", src_heads: Mapping[str, HeadGroup] | None = None,
                 out_dtype: torch.dtype | None = None, backend: str = "auto") -> dict[str, torch.Tensor]:
    """Merge a donor of other widths into the base through partial maps (see the module docstring)."""
    if uncovered not in ("shrink", "keep"):
        raise ValueError(f"uncovered must be 'shrink' or 'keep', not {uncovered!r}")
    if src_heads is None:
        src_heads = infer_heads(spec, _shapes(donor))
    return aligned_average(base, [donor], [perms], [1.0 - lam, lam], spec=spec,
                           normalize_coverage=(uncovered == "keep"), out_dtype=out_dtype,
                           backend=backend, src_heads=[src_heads])


def pad_width(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: str,
              new_size: int) -> dict[str, torch.Tensor]:
    """Zero-pad every axis carrying plain permutation ``perm`` to ``new_size`` units.

    Exact for a layer-local width (an MLP's hidden or intermediate units): the
    new units receive zero weights and send zero weights. Not exact for the
    residual stream (norms see the extra zeros).
    """
    if perm not in spec.perm_axes:
        raise ValueError(f"{perm!r} is not a plain permutation of the spec")
    out = dict(state_dict)
    for t, ax in spec.perm_axes[perm]:
        if t not in out:
            continue
        n = out[t].shape[ax]
        if new_size < n:
            raise ValueError(f"{t} axis {ax} has {n} units, more than new_size {new_size}")
        idx = torch.cat([torch.arange(n), torch.full((new_size - n,), -1, dtype=torch.int64)])
        out[t] = take(out[t], ax, idx).contiguous()
    return out


def pad_heads(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, n_kv_heads: int,
              groups: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], PermutationSpec]:
    """Zero-pad head groups to ``n_kv_heads`` KV heads (query heads grow with them).

    Exact: a zero head attends uniformly to zero values and its output
    columns are zero. head_dim is unchanged, so a config must state it
    explicitly (``head_dim``) next to the new head counts. Returns the padded
    state dict and the spec of the padded model.
    """
    out = dict(state_dict)
    heads = dict(spec.heads)
    for g in (spec.heads if groups is None else groups):
        src = spec.heads[g]
        if n_kv_heads < src.n_kv_heads:
            raise ValueError(f"{g}: {src.n_kv_heads} KV heads, more than {n_kv_heads}")
        dst = src.resized(n_kv_heads)
        sigma = torch.cat([torch.arange(src.n_kv_heads), torch.full((n_kv_heads - src.n_kv_heads,), -1, dtype=torch.int64)])
        comps = {"heads": sigma,
                 "q_in_group": torch.arange(dst.group_size).expand(n_kv_heads, -1),
                 "qk_within": torch.arange(dst.head_dim).expand(n_kv_heads, -1),
                 "vo_within": torch.arange(dst.head_dim).expand(n_kv_heads, -1)}
        for t, ax, role in spec.group_axes[g]:
            if t in out:
                out[t] = take(out[t], ax, head_map(comps, dst, src, role)).contiguous()
        heads[g] = dst
    new_spec = PermutationSpec(spec.axes, heads, sizes=spec.sizes, global_perms=spec.global_perms)
    return out, new_spec

