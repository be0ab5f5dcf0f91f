"""Task-vector statistics of a model family, streamed tensor by tensor.

For models θ_1..θ_N fine-tuned from a base θ_0, with task vectors τ_i = θ_i − θ_0
(fp32, from the stored values), per layer and over the whole model:

- norms ‖τ_i‖ and the relative size ‖τ_i‖ / ‖θ_0‖;
- pairwise cosine similarities ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖) (0 when a vector is zero);
- sign conflicts: pairwise, the fraction of the entries where both τ_i and τ_j are
  nonzero in which their signs are opposite; over all tasks, the fraction of the
  parameters where some task is positive and another negative (TIES-Merging's
  motivation), also after trimming every τ_i to each density (per tensor, exactly
  k = int(density · numel) kept, as mergekit's TIES does);
- what a density keeps: the share of ‖τ_i‖² held by the k largest |τ_i| of each tensor,
  and the share of exact zeros already in τ_i;
- EMR-Merging's masks and rescalers: per model, the fraction of the parameters whose
  sign agrees with the elected one (the mask density), and the rescaler λ_i computed
  as the engine does (`rescale_scope` tensor_mean_sum by default) over the layer's
  tensors, and over the whole model for the overall row.

Tensors are read one name at a time (base and the N models' tensors of that name,
nothing else), so the statistics of a model larger than memory can be gathered.
Tensors that are not floating point, are missing from a model, or whose shapes
differ between models (task heads) are skipped and listed; that is what the engine
leaves out of a merge too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from pymerge import ops
from pymerge.config import layer_index
from pymerge.io import CheckpointReader
from pymerge.ops.reference.emr import RESCALE_SCOPES, emr_rescalers
from pymerge.ops.reference.ties import trim_count

__all__ = [
    "DEFAULT_DENSITIES",
    "GroupStats",
    "InspectReport",
    "inspect_models",
    "add_inspect_arguments",
    "run_inspect",
    "main_inspect",
]

DEFAULT_DENSITIES = (0.1, 0.2, 0.5)
_CHUNK = 1 << 22  # elements per chunk for the fp64 products
_EMBED_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


# ---------------------------------------------------------------------------------------
# Sources: a checkpoint folder/file (streamed) or an in-memory state dict.
# ---------------------------------------------------------------------------------------


class _Source:
    def __init__(self, src: Any):
        self.reader: CheckpointReader | None = None
        self.mapping: Mapping[str, torch.Tensor] | None = None
        if isinstance(src, Mapping):
            self.mapping = src
            self.label = "<state dict>"
        elif isinstance(src, CheckpointReader):
            self.reader = src
            self.label = str(src.path)
            self._owned = False
        else:
            self.reader = CheckpointReader(src)
            self.label = str(src)
            self._owned = True

    def names(self) -> list[str]:
        return self.reader.names() if self.reader is not None else list(self.mapping)

    def __contains__(self, name: str) -> bool:
        return name in (self.reader if self.reader is not None else self.mapping)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.shape(name)) if self.reader is not None else tuple(self.mapping[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name) if self.reader is not None else self.mapping[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name) if self.reader is not None else self.mapping[name]

    def close(self) -> None:
        if self.reader is not None and getattr(self, "_owned", False):
            self.reader.close()


# ---------------------------------------------------------------------------------------
# Accumulated statistics of a group of tensors (a layer, a tensor, or the whole model)
# ---------------------------------------------------------------------------------------


@dataclass
class GroupStats:
    """Sums over the tensors of one group; every reported number derives from them (fp64)."""

    name: str
    n_models: int
    densities: tuple[float, ...]
    tensors: list[str] = field(default_factory=list)
    numel: int = 0
    base_sq: float = 0.0
    gram: np.ndarray = None  # [N, N] sum tau_i tau_j
    sign_dot: np.ndarray = None  # [N, N] sum sign(tau_i) sign(tau_j)
    both_nonzero: np.ndarray = None  # [N, N] count of entries nonzero in both
    zeros: np.ndarray = None  # [N] count of exact zeros
    conflicts: int = 0  # parameters with a positive and a negative task
    trimmed_conflicts: np.ndarray = None  # [D] the same after trimming to each density
    kept_sq: np.ndarray = None  # [D, N] sum of the squares kept by each density
    emr_mask_count: np.ndarray = None  # [N]
    emr_tau_sums: list[list[float]] = field(default_factory=list)  # per tensor [N]
    emr_u_sums: list[list[float]] = field(default_factory=list)  # per tensor [N]
    emr_numels: list[int] = field(default_factory=list)
    rescale_scope: str = "tensor_mean_sum"

    def __post_init__(self):
        n, d = self.n_models, len(self.densities)
        for attr, shape in (("gram", (n, n)), ("sign_dot", (n, n)), ("both_nonzero", (n, n)), ("zeros", (n,)),
                            ("trimmed_conflicts", (d,)), ("kept_sq", (d, n)), ("emr_mask_count", (n,))):
            if getattr(self, attr) is None:
                setattr(self, attr, np.zeros(shape, dtype=np.float64))

    def add(self, other: "GroupStats") -> None:
        self.tensors += other.tensors
        self.numel += other.numel
        self.base_sq += other.base_sq
        for attr in ("gram", "sign_dot", "both_nonzero", "zeros", "trimmed_conflicts", "kept_sq", "emr_mask_count"):
            setattr(self, attr, getattr(self, attr) + getattr(other, attr))
        self.conflicts += other.conflicts
        self.emr_tau_sums += other.emr_tau_sums
        self.emr_u_sums += other.emr_u_sums
        self.emr_numels += other.emr_numels

    # -- derived numbers ------------------------------------------------------------------
    @property
    def norms(self) -> np.ndarray:
        """‖τ_i‖ over the group."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0))

    @property
    def base_norm(self) -> float:
        return math.sqrt(self.base_sq)

    @property
    def relative_norms(self) -> np.ndarray:
        """‖τ_i‖ / ‖θ_0‖ (inf where the base is zero and τ_i is not)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.norms / self.base_norm if self.base_norm > 0 else np.where(self.norms > 0, np.inf, 0.0)
        return np.asarray(r, dtype=np.float64)

    @property
    def cosine(self) -> np.ndarray:
        """Pairwise cosine similarities (1 on the diagonal of a nonzero vector, 0 for a zero vector)."""
        n = self.norms
        denom = np.outer(n, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.where(denom > 0, self.gram / np.where(denom > 0, denom, 1.0), 0.0)
        return np.clip(c, -1.0, 1.0)

    @property
    def pairwise_conflict(self) -> np.ndarray:
        """Fraction of the entries nonzero in both τ_i and τ_j whose signs are opposite (0 if none)."""
        opposite = (self.both_nonzero - self.sign_dot) / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.both_nonzero > 0, opposite / np.where(self.both_nonzero > 0, self.both_nonzero, 1.0), 0.0)

    @property
    def conflict_fraction(self) -> float:
        """Fraction of the parameters where one task is positive and another negative."""
        return self.conflicts / self.numel if self.numel else 0.0

    @property
    def trimmed_conflict_fraction(self) -> np.ndarray:
        """conflict_fraction after trimming each τ_i to each density (one value per density)."""
        return self.trimmed_conflicts / self.numel if self.numel else np.zeros(len(self.densities))

    @property
    def kept_energy(self) -> np.ndarray:
        """[D, N]: share of ‖τ_i‖² held by the int(density · numel) largest |τ_i| of each tensor."""
        total = np.diag(self.gram)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, self.kept_sq / np.where(total > 0, total, 1.0), 1.0)

    @property
    def zero_fraction(self) -> np.ndarray:
        return self.zeros / self.numel if self.numel else np.zeros(self.n_models)

    @property
    def emr_mask_density(self) -> np.ndarray:
        return self.emr_mask_count / self.numel if self.numel else np.zeros(self.n_models)

    @property
    def emr_rescalers(self) -> list[float]:
        if not self.emr_numels:
            return [1.0] * self.n_models
        return emr_rescalers(self.emr_tau_sums, self.emr_u_sums, self.emr_numels, scope=self.rescale_scope)

    def pair_values(self, matrix: np.ndarray) -> np.ndarray:
        iu = np.triu_indices(self.n_models, k=1)
        return matrix[iu]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tensors": list(self.tensors),
            "numel": self.numel,
            "base_norm": self.base_norm,
            "norms": self.norms.tolist(),
            "relative_norms": self.relative_norms.tolist(),
            "cosine": self.cosine.tolist(),
            "pairwise_sign_conflict": self.pairwise_conflict.tolist(),
            "sign_conflict_fraction": self.conflict_fraction,
            "trimmed_sign_conflict_fraction": dict(zip(map(str, self.densities), self.trimmed_conflict_fraction.tolist())),
            "kept_energy": {str(d): row.tolist() for d, row in zip(self.densities, self.kept_energy)},
            "zero_fraction": self.zero_fraction.tolist(),
            "emr_mask_density": self.emr_mask_density.tolist(),
            "emr_rescalers": self.emr_rescalers,
        }


def _top_k(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(mask of the k largest |tau|, ties at the threshold kept lower index first; sum of their squares).

    The same set as `pymerge.ops.reference.ties.topk_keep_mask`, found with one selection instead
    of a full sort, so that the temporaries stay a few bytes per element.
    """
    n = tau.numel()
    a = tau.abs()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool), 0.0
    if k >= n:
        return torch.ones(n, dtype=torch.bool), float(a.double().pow(2).sum())
    t = torch.kthvalue(a, n - k + 1).values  # the k-th largest
    keep = a > t
    room = k - int(keep.sum())
    if room > 0:
        ties = torch.nonzero(a == t).reshape(-1)[:room]  # ascending flat index
        keep[ties] = True
    kept_sq = float(torch.where(keep, a, torch.zeros((), dtype=a.dtype)).double().pow(2).sum())
    return keep, kept_sq


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits per row of int32 words [N, W] (the EMR bit-planes), as int64 [N]."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = ((x * 0x01010101) & 0xFFFFFFFF) >> 24
    return x.sum(dim=-1)


def _tensor_stats(name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], densities: tuple[float, ...],
                  emr: bool, zero_sign: str, rescale_scope: str, chunk: int) -> GroupStats:
    """The statistics of one tensor name."""
    n_models = len(tensors)
    st = GroupStats(name, n_models, densities, rescale_scope=rescale_scope)
    st.tensors.append(name)
    numel = base.numel()
    st.numel = numel
    b32 = base.to(torch.float32).reshape(-1)
    tau = torch.stack([t.to(torch.float32).reshape(-1) - b32 for t in tensors])  # [N, numel] fp32
    if not bool(torch.isfinite(tau).all()):
        raise ValueError(f"{name}: the task vectors hold NaN or Inf values")
    st.base_sq = float(b32.double().pow(2).sum())
    # products in fp64, chunked over the elements to bound the temporaries
    for s in range(0, numel, chunk):
        part = tau[:, s:s + chunk].double()
        sgn = torch.sign(part)
        nz = (sgn != 0).double()
        st.gram += (part @ part.T).numpy()
        st.sign_dot += (sgn @ sgn.T).numpy()
        st.both_nonzero += (nz @ nz.T).numpy()
        st.conflicts += int(((part > 0).any(0) & (part < 0).any(0)).sum())
        st.zeros += (part == 0).sum(dim=1).double().numpy()
    # trimming: per model and density, the exact top-k (ties at the threshold: lower index first)
    for k_i, d in enumerate(densities):
        k = trim_count(d, numel)
        has_pos = torch.zeros(numel, dtype=torch.bool)
        has_neg = torch.zeros(numel, dtype=torch.bool)
        for i in range(n_models):
            keep, kept_sq = _top_k(tau[i], k)
            st.kept_sq[k_i, i] = kept_sq
            has_pos |= keep & (tau[i] > 0)
            has_neg |= keep & (tau[i] < 0)
            del keep
        st.trimmed_conflicts[k_i] = int((has_pos & has_neg).sum())
        del has_pos, has_neg
    if emr:
        e = ops.emr_elect(base, list(tensors), zero_sign=zero_sign, out_dtype=torch.float32)
        st.emr_mask_count += _popcount(e.masks.cpu()).double().numpy()
        st.emr_tau_sums.append([float(v) for v in e.abs_tau_sum])
        st.emr_u_sums.append([float(v) for v in e.abs_masked_u_sum])
        st.emr_numels.append(numel)
    return st


def _group_key(name: str, group: str) -> str:
    if group == "tensor":
        return name
    if group == "model":
        return "model"
    idx = layer_index(name)
    return f"layer {idx}" if idx is not None else name


def _group_order(keys: Iterable[str], group: str, first_seen: Mapping[str, int]) -> list[str]:
    def rank(k: str):
        if group == "tensor":
            idx = layer_index(k)
        else:
            idx = int(k.split()[1]) if k.startswith("layer ") and k.split()[1].isdigit() else None
        if idx is not None:
            return (1, idx, first_seen[k])
        if any(h in k for h in _EMBED_HINTS):
            return (0, 0, first_seen[k])
        return (2, 0, first_seen[k])

    return sorted(keys, key=rank)


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


@dataclass
class InspectReport:
    """Per-group and overall task-vector statistics of N models against one base."""

    base: str
    models: list[str]
    densities: tuple[float, ...]
    groups: list[GroupStats]
    overall: GroupStats
    skipped: list[tuple[str, str]] = field(default_factory=list)
    emr: bool = True

    @property
    def n_models(self) -> int:
        return len(self.models)

    def group(self, name: str) -> GroupStats:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "models": list(self.models),
            "densities": list(self.densities),
            "overall": self.overall.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "skipped": [{"tensor": n, "reason": r} for n, r in self.skipped],
        }

    # -- text ----------------------------------------------------------------------------
    def format(self, *, max_groups: int | None = None) -> str:
        n = self.n_models
        o = self.overall
        lines = [
            f"task vectors of {n} models against base {self.base}: {len(o.tensors)} tensors, "
            f"{o.numel:,} parameters compared"
            + (f"; {len(self.skipped)} tensors skipped" if self.skipped else ""),
        ]
        lines += [f"  [{i}] {m}" for i, m in enumerate(self.models)]
        if self.skipped:
            shown = ", ".join(f"{name} ({why})" for name, why in self.skipped[:6])
            more = f", ... {len(self.skipped) - 6} more" if len(self.skipped) > 6 else ""
            lines.append(f"  skipped: {shown}{more}")
        lines.append("")
        lines.append("overall, per model")
        dens_cols = [f"keeps ‖τ‖² @{_d(d)}" for d in self.densities]
        header = ["model", "‖τ‖", "‖τ‖/‖θ0‖", "zeros"] + dens_cols
        if self.emr:
            header += ["EMR mask", "EMR λ"]
        rows = []
        lam = o.emr_rescalers
        for i in range(n):
            row = [f"[{i}]", _g(o.norms[i]), _g(o.relative_norms[i]), _pct(o.zero_fraction[i])]
            row += [_pct(o.kept_energy[k, i]) for k in range(len(self.densities))]
            if self.emr:
                row += [_pct(o.emr_mask_density[i]), f"{lam[i]:.4f}"]
            rows.append(row)
        lines += _table(header, rows)
        lines.append("")
        lines.append(f"overall, pairwise cosine similarity (‖θ0‖ = {_g(o.base_norm)})")
        lines += _matrix(o.cosine, "{:+.4f}")
        lines.append("")
        lines.append("overall, pairwise sign conflicts (share of the entries nonzero in both with opposite signs)")
        lines += _matrix(o.pairwise_conflict, "{:.4f}")
        lines.append("")
        trims = ", ".join(f"{_pct(v)} after trimming to density {_d(d)}"
                          for d, v in zip(self.densities, o.trimmed_conflict_fraction))
        lines.append(f"parameters with a sign conflict between tasks: {_pct(o.conflict_fraction)}"
                     + (f" ({trims})" if trims else ""))
        lines.append("")
        groups = self.groups if max_groups is None else self.groups[:max_groups]
        lines.append(f"per group ({len(self.groups)})" + ("" if groups is self.groups else f", first {len(groups)} shown"))
        header = ["group", "params", "‖τ‖/‖θ0‖ per model", "cos min/mean/max", "conflict"]
        header += [f"conflict @{_d(d)}" for d in self.densities[:1]]
        header += [f"keeps @{_d(d)}" for d in self.densities[:1]]
        if self.emr:
            header += ["EMR mask per model", "EMR λ per model"]
        rows = []
        for g in groups:
            pairs = g.pair_values(g.cosine)
            cos = f"{pairs.min():+.3f}/{pairs.mean():+.3f}/{pairs.max():+.3f}" if pairs.size else "-"
            row = [g.name, f"{g.numel:,}", " ".join(_g(v) for v in g.relative_norms), cos, _pct(g.conflict_fraction)]
            if self.densities:
                row += [_pct(g.trimmed_conflict_fraction[0]), _pct(float(np.mean(g.kept_energy[0])))]
            if self.emr:
                row += [" ".join(_pct(v) for v in g.emr_mask_density), " ".join(f"{v:.3f}" for v in g.emr_rescalers)]
            rows.append(row)
        lines += _table(header, rows)
        return "\n".join(lines)

    __str__ = format

    # -- plot ----------------------------------------------------------------------------
    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw the overall similarity matrix and the per-group curves into an image (Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = self.n_models
        o = self.overall
        fig, axes = plt.subplots(2, 2, figsize=(12, 9))
        ax = axes[0, 0]
        im = ax.imshow(o.cosine, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title("cosine similarity of the task vectors")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        labels = [f"[{i}]" for i in range(n)]
        ax.set_xticklabels(labels)
        ax.set_yticklabels(labels)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{o.cosine[i, j]:+.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(o.cosine[i, j]) > 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

        x = np.arange(len(self.groups))
        names = [g.name for g in self.groups]
        ax = axes[0, 1]
        for i in range(n):
            ax.plot(x, [g.relative_norms[i] for g in self.groups], marker="o", ms=3, label=f"[{i}]")
        ax.set_title("‖τ‖ / ‖θ0‖ per group")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax = axes[1, 0]
        iu = np.triu_indices(n, k=1)
        if len(iu[0]) <= 10:
            for i, j in zip(*iu):
                ax.plot(x, [g.cosine[i, j] for g in self.groups], marker="o", ms=3, label=f"[{i}]·[{j}]")
            ax.legend(fontsize=7)
        elif len(iu[0]):
            ax.plot(x, [g.pair_values(g.cosine).mean() for g in self.groups], marker="o", ms=3, label="mean")
            ax.fill_between(x, [g.pair_values(g.cosine).min() for g in self.groups],
                            [g.pair_values(g.cosine).max() for g in self.groups], alpha=0.2, label="min-max")
            ax.legend(fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title("pairwise cosine per group")
        ax = axes[1, 1]
        ax.plot(x, [g.conflict_fraction for g in self.groups], marker="o", ms=3, color="k", label="sign conflict")
        for k, d in enumerate(self.densities):
            ax.plot(x, [g.trimmed_conflict_fraction[k] for g in self.groups], ls="--", label=f"conflict after trim {_d(d)}")
        if self.emr:
            for i in range(n):
                ax.plot(x, [g.emr_mask_density[i] for g in self.groups], ls=":", label=f"EMR mask [{i}]")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("sign conflicts and EMR mask densities per group")
        ax.legend(fontsize=6, ncol=2)
        for ax in (axes[0, 1], axes[1, 0], axes[1, 1]):
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6 if len(names) > 20 else 8)
        fig.suptitle(title or f"{n} task vectors against {Path(self.base).name}")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _d(d: float) -> str:
    return f"{d:g}"


def _g(v: float) -> str:
    return f"{v:.4g}"


def _pct(v: float) -> str:
    return f"{100 * float(v):.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return [line.rstrip() for line in lines]


def _matrix(m: np.ndarray, fmt: str) -> list[str]:
    n = m.shape[0]
    cells = [[fmt.format(m[i, j]) for j in range(n)] for i in range(n)]
    return _table([""] + [f"[{j}]" for j in range(n)], [[f"[{i}]"] + cells[i] for i in range(n)])


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def inspect_models(models: Sequence[Any], base: Any, *, densities: Sequence[float] = DEFAULT_DENSITIES,
                   group: str = "layer", emr: bool = True, zero_sign: str = "neg",
                   rescale_scope: str = "tensor_mean_sum", labels: Sequence[str] | None = None,
                   chunk_elements: int = _CHUNK) -> InspectReport:
    """Statistics of the task vectors of `models` against `base`, streamed one tensor name at a time.

    models, base: checkpoint paths (folders or files), CheckpointReaders, or state dicts.
    group: "layer" (tensors of one layer index together; others by name), "tensor" or "model".
    densities: trim densities for the kept-energy and trimmed-conflict numbers.
    emr: gather EMR's mask densities and rescalers (zero_sign and rescale_scope as the merge).
    """
    if len(models) < 1:
        raise ValueError("inspect needs at least one model besides the base")
    if group not in ("layer", "tensor", "model"):
        raise ValueError(f"group must be 'layer', 'tensor' or 'model', not {group!r}")
    if rescale_scope not in RESCALE_SCOPES:
        raise ValueError(f"rescale_scope must be one of {RESCALE_SCOPES}, got {rescale_scope!r}")
    densities = tuple(float(d) for d in densities)
    for d in densities:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density {d} is not in [0, 1]")
    sources: list[_Source] = []
    try:
        base_src = _Source(base)
        sources.append(base_src)
        for m in models:
            sources.append(_Source(m))
        model_srcs = sources[1:]
        names = [str(x) for x in labels] if labels is not None else [s.label for s in model_srcs]
        if len(names) != len(model_srcs):
            raise ValueError(f"{len(names)} labels for {len(model_srcs)} models")
        n = len(model_srcs)
        groups: dict[str, GroupStats] = {}
        first_seen: dict[str, int] = {}
        overall = GroupStats("overall", n, densities, rescale_scope=rescale_scope)
        skipped: list[tuple[str, str]] = []
        for pos, name in enumerate(base_src.names()):
            if not base_src.dtype(name).is_floating_point:
                skipped.append((name, "not floating point"))
                continue
            missing = [i for i, s in enumerate(model_srcs) if name not in s]
            if missing:
                skipped.append((name, "missing from " + ", ".join(f"[{i}]" for i in missing)))
                continue
            if any(not s.dtype(name).is_floating_point for s in model_srcs):
                skipped.append((name, "not floating point in every model"))
                continue
            shape = base_src.shape(name)
            if any(s.shape(name) != shape for s in model_srcs):
                skipped.append((name, "shapes differ"))
                continue
            if math.prod(shape) == 0:
                skipped.append((name, "empty"))
                continue
            b = base_src.get(name)
            ts = [s.get(name) for s in model_srcs]
            st = _tensor_stats(name, b, ts, densities, emr, zero_sign, rescale_scope, chunk_elements)
            del b, ts
            key = _group_key(name, group)
            if key not in groups:
                groups[key] = GroupStats(key, n, densities, rescale_scope=rescale_scope)
                first_seen[key] = pos
            groups[key].add(st)
            overall.add(st)
        order = _group_order(groups, group, first_seen)
        return InspectReport(base=base_src.label, models=names, densities=densities,
                             groups=[groups[k] for k in order], overall=overall, skipped=skipped, emr=emr)
    finally:
        for s in sources:
            s.close()


# ---------------------------------------------------------------------------------------
# Command line (wired into `pymerge inspect` by pymerge.cli)
# ---------------------------------------------------------------------------------------


def add_inspect_arguments(p) -> None:
    """Add `pymerge inspect`'s arguments to an argparse parser."""
    p.add_argument("models", nargs="+", help="the fine-tuned checkpoints (folders or files)")
    p.add_argument("--base", required=True, help="the base checkpoint they were fine-tuned from")
    p.add_argument("--density", type=float, nargs="+", default=list(DEFAULT_DENSITIES),
                   help="trim densities to report (default: 0.1 0.2 0.5)")
    p.add_argument("--group", choices=["layer", "tensor", "model"], default="layer",
                   help="rows of the per-group table (default: layer)")
    p.add_argument("--no-emr", action="store_true", help="skip EMR's mask densities and rescalers")
    p.add_argument("--rescale-scope", choices=list(RESCALE_SCOPES), default="tensor_mean_sum",
                   help="EMR rescaler definition (default: tensor_mean_sum, the engine's default)")
    p.add_argument("--plot", metavar="PNG", help="draw the similarity matrix and per-group curves here")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON here")
    p.add_argument("--max-groups", type=int, help="print at most this many per-group rows")


def run_inspect(args) -> int:
    """Run `pymerge inspect` from parsed arguments; prints the table. Returns the exit status."""
    import json

    report = inspect_models(args.models, args.base, densities=args.density, group=args.group, emr=not args.no_emr,
                            rescale_scope=args.rescale_scope)
    print(report.format(max_groups=args.max_groups))
    if args.plot:
        print(f"plot written to {report.plot(args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"numbers written to {args.json}")
    return 0


def main_inspect(argv: Sequence[str] | None = None) -> int:
    """`pymerge inspect MODELS... --base B [--plot out.png]` as a standalone entry point."""
    import argparse

    p = argparse.ArgumentParser(prog="pymerge inspect", description="task-vector statistics of a model family")
    add_inspect_arguments(p)
    return run_inspect(p.parse_args(argv))
