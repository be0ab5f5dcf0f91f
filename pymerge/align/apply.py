"""Applying permutation sets: permuted state dicts, aligned averages, permutation files.

``aligned_average`` never builds a permuted copy of a model: each output tensor
is one ``pymerge.ops.permute_average`` call that reads every model through its
index maps (-1 reads zero). Permutation files are safetensors of int64 arrays
with JSON metadata (the spec travels with them); nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pymerge import ops
from pymerge.align.spec import HeadGroup, PermutationSpec, spec_from_dict, spec_to_dict

__all__ = [
    "tensor_maps",
    "take",
    "permute_tensor",
    "permuted_tensor",
    "permute_state_dict",
    "aligned_tensor",
    "average_with_maps",
    "aligned_average",
    "iter_aligned_average",
    "save_permutations",
    "load_permutations",
    "load_permutation_file",
    "PermutationFile",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FILE_FORMAT = "pymerge-permutations"
FILE_VERSION = "1"

Perms = Mapping[str, torch.Tensor]


def tensor_maps(spec: PermutationSpec, perms: Perms, name: str, ndim: int, *,
                src_heads: Mapping[str, HeadGroup] | None = None) -> list[torch.Tensor | None]:
    """One flat index array (or None for identity) per axis of tensor ``name``."""
    refs = spec.axes.get(name)
    if refs is None:
        return [None] * ndim
    if len(refs) != ndim:
        raise ValueError(f"spec gives {len(refs)} axes for {name} but the tensor is {ndim}-D")
    return [spec.axis_map(perms, r, src_heads=src_heads) for r in refs]


def take(x: torch.Tensor, axis: int, idx: torch.Tensor | None) -> torch.Tensor:
    """x indexed along axis by idx; -1 entries give zeros."""
    if idx is None:
        return x
    idx = idx.to(device=x.device, dtype=torch.int64)
    if x.shape[axis] == 0:
        shape = list(x.shape)
        shape[axis] = idx.shape[0]
        return x.new_zeros(shape)
    out = x.index_select(axis, idx.clamp_min(0))
    if bool((idx < 0).any()):
        shape = [1] * x.dim()
        shape[axis] = idx.shape[0]
        out = out * (idx >= 0).reshape(shape).to(out.dtype)
    return out


def permute_tensor(x: torch.Tensor, maps: Sequence[torch.Tensor | None]) -> torch.Tensor:
    for axis, idx in enumerate(maps):
        x = take(x, axis, idx)
    return x


def permuted_tensor(name: str, x: torch.Tensor, spec: PermutationSpec, perms: Perms, *,
                    src_heads: Mapping[str, HeadGroup] | None = None) -> torch.Tensor:
    """One tensor of a model re-indexed into the reference's coordinates (identity if the spec lacks it).

    For merge methods other than averaging: permute each input tensor as it is read.
    """
    if name not in spec.axes:
        return x
    return permute_tensor(x, tensor_maps(spec, perms, name, x.dim(), src_heads=src_heads)).contiguous()


def permute_state_dict(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms, *,
                       src_heads: Mapping[str, HeadGroup] | None = None) -> dict[str, torch.Tensor]:
    """A new state dict with every spec tensor re-indexed by ``perms``.

    Tensors the spec does not name are returned unchanged (the same objects).
    Meant for tests and small models: it materialises the permuted copy.
    """
    return {name: permuted_tensor(name, x, spec, perms, src_heads=src_heads) for name, x in state_dict.items()}


# -- aligned averaging ---------------------------------------------------------------------


def _names(src: Any) -> list[str]:
    return src.names() if hasattr(src, "names") and callable(src.names) else list(src)


def _get(src: Any, name: str) -> torch.Tensor:
    if hasattr(src, "get") and not isinstance(src, Mapping):
        return src.get(name)
    try:
        return src[name]
    except KeyError:
        raise KeyError(f"tensor {name!r} missing from one of the models") from None


def _flatten_maps(shape: Sequence[int], maps: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Maps of several axes as one map over those axes flattened (row-major)."""
    if all(m is None for m in maps):
        return None
    k = len(shape)
    idx = torch.zeros((), dtype=torch.int64)
    valid = torch.ones((), dtype=torch.bool)
    stride = 1
    for a in reversed(range(k)):
        m = torch.arange(shape[a]) if maps[a] is None else maps[a].to(torch.int64)
        view = [1] * k
        view[a] = m.shape[0]
        m = m.reshape(view)
        idx = idx + m.clamp_min(0) * stride
        valid = valid & (m >= 0)
        stride *= shape[a]
    return torch.where(valid, idx, -1).reshape(-1)


def average_with_maps(tensors: list[torch.Tensor], coeffs: list[float], maps: list[list[torch.Tensor | None]], *,
                      normalize_coverage: bool, out_dtype: torch.dtype | None, backend: str) -> torch.Tensor:
    """sum_i c_i * tensors[i] re-indexed by maps[i] (one index map or None per axis), as one permute_average."""
    ndim = tensors[0].dim()
    if ndim <= 2:
        ts = [t.reshape(1) if ndim == 0 else t for t in tensors]
        rows = [m[0] if ndim else None for m in maps]
        cols = [m[1] for m in maps] if ndim == 2 else None
        out = ops.permute_average(ts, coeffs, rows, cols, normalize_coverage=normalize_coverage,
                                  out_dtype=out_dtype, backend=backend)
        return out.reshape(()) if ndim == 0 else out
    # higher-rank tensors (convolutions): the trailing axes fold into one column map
    trailing = list(tensors[0].shape[1:])
    for m in maps:
        for axis in range(1, ndim):
            if m[axis] is not None:
                trailing[axis - 1] = m[axis].shape[0]
    flat = [t.reshape(t.shape[0], -1) for t in tensors]
    rows = [m[0] for m in maps]
    cols = [_flatten_maps(t.shape[1:], m[1:]) for t, m in zip(tensors, maps)]
    out = ops.permute_average(flat, coeffs, rows, cols, normalize_coverage=normalize_coverage,
                              out_dtype=out_dtype, backend=backend)
    return out.reshape(out.shape[0], *trailing)


def iter_aligned_average(
    base: Any,
    others: Sequence[Any],
    perms: Sequence[Perms | None] | Perms | None,
    coeffs: Sequence[float] | None = None,
    *,
    spec: PermutationSpec,
    names: Sequence[str] | None = None,
    normalize_coverage: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    src_heads: Sequence[Mapping[str, HeadGroup] | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) in the base's order: one ``permute_average`` per tensor.

    out = c_0 * base + sum_i c_i * pi_i(other_i), pi_i applying ``perms[i]``
    through index maps. base and others: state dicts or CheckpointReaders (read
    one tensor at a time). Non-float tensors are copied from the base.
    """
    others = list(others)
    if perms is None or isinstance(perms, Mapping):
        perms = [perms] * len(others)
    perms = list(perms)
    if len(perms) != len(others):
        raise ValueError(f"{len(perms)} permutation sets for {len(others)} models")
    n = len(others) + 1
    coeffs = [1.0 / n] * n if coeffs is None else [float(c) for c in coeffs]
    if len(coeffs) != n:
        raise ValueError(f"{len(coeffs)} coefficients for {n} models (base first)")
    src_heads = list(src_heads) if src_heads is not None else [None] * len(others)
    for name in (names if names is not None else _names(base)):
        b = _get(base, name)
        yield name, aligned_tensor(name, [b] + [_get(o, name) for o in others], perms, coeffs, spec=spec,
                                   normalize_coverage=normalize_coverage, out_dtype=out_dtype, backend=backend,
                                   src_heads=src_heads)


def aligned_tensor(
    name: str,
    tensors: Sequence[torch.Tensor],
    perms: Sequence[Perms | None],
    coeffs: Sequence[float],
    *,
    spec: PermutationSpec,
    normalize_coverage: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    src_heads: Sequence[Mapping[str, HeadGroup] | None] | None = None,
) -> torch.Tensor:
    """One output tensor: sum_i c_i * pi_i(tensors[i]) by one permute_average call.

    tensors: the base's tensor first, then one per other model; perms: one set
    per other model (None = identity); coeffs: one per tensor. A non-float base
    tensor is returned as is. This is the per-tensor form a streaming engine calls.
    """
    b = tensors[0]
    if b.dtype not in FLOAT_DTYPES:
        return b
    if len(perms) != len(tensors) - 1 or len(coeffs) != len(tensors):
        raise ValueError(f"{name}: {len(tensors)} tensors need {len(tensors) - 1} permutation sets and "
                         f"{len(tensors)} coefficients, got {len(perms)} and {len(coeffs)}")
    src_heads = list(src_heads) if src_heads is not None else [None] * len(perms)
    maps = [[None] * b.dim()]
    for i, p in enumerate(perms):
        maps.append(tensor_maps(spec, p or {}, name, tensors[i + 1].dim(), src_heads=src_heads[i]))
    return average_with_maps(list(tensors), [float(c) for c in coeffs], maps, normalize_coverage=normalize_coverage,
                             out_dtype=out_dtype, backend=backend)


def aligned_average(
    base: Any,
    others: Sequence[Any] | Any,
    perms: Sequence[Perms | None] | Perms | None,
    coeffs: Sequence[float] | None = None,
    *,
    spec: PermutationSpec,
    names: Sequence[str] | None = None,
    normalize_coverage: bool = False,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    src_heads: Sequence[Mapping[str, HeadGroup] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Merged state dict: c_0 * base + sum_i c_i * pi_i(others[i]), without permuted copies.

    base: a state dict or CheckpointReader (the reference coordinates).
    others: one model or a list (state dicts or readers). perms: one set per
    other model (a single set when there is one other; None = identity).
    coeffs: base first; default uniform. ``normalize_coverage`` divides each
    entry by the coefficients of the models that cover it (partial maps).
    """
    if isinstance(others, Mapping) or hasattr(others, "names"):
        others = [others]
    return dict(iter_aligned_average(base, others, perms, coeffs, spec=spec, names=names,
                                     normalize_coverage=normalize_coverage, out_dtype=out_dtype,
                                     backend=backend, src_heads=src_heads))


# -- permutation files ---------------------------------------------------------------------


@dataclass
class PermutationFile:
    perms: dict[str, torch.Tensor]
    spec: PermutationSpec | None
    metadata: dict[str, Any]


def save_permutations(path: str | os.PathLike, perms: Perms, *, spec: PermutationSpec | None = None,
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a permutation set as safetensors (int64 arrays) with the spec and metadata as JSON."""
    path = Path(path)
    tensors = {}
    for k, v in perms.items():
        if not isinstance(v, torch.Tensor) or v.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"permutation {k}: expected an integer tensor")
        tensors[k] = v.detach().to("cpu", torch.int64).contiguous()
    meta = {"format": FILE_FORMAT, "version": FILE_VERSION,
            "metadata": json.dumps(dict(metadata or {}), sort_keys=True)}
    if spec is not None:
        meta["spec"] = json.dumps(spec_to_dict(spec), separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_permutation_file(path: str | os.PathLike) -> PermutationFile:
    """Read a file written by save_permutations: perms, spec (or None) and metadata."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path}: not a pymerge permutation file (format {meta.get('format')!r})")
        if meta.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: unsupported permutation file version {meta.get('version')!r}")
        perms = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in perms.items():
        if v.dtype != torch.int64 or v.dim() not in (1, 2):
            raise ValueError(f"{path}: permutation {k} is {v.dtype} of shape {tuple(v.shape)}, expected int64 1-D/2-D")
    spec = spec_from_dict(json.loads(meta["spec"])) if "spec" in meta else None
    if spec is not None:
        spec.validate(perms, partial=True)
    return PermutationFile(perms, spec, json.loads(meta.get("metadata", "{}")))


def load_permutations(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The permutation set of a file written by save_permutations."""
    return load_permutation_file(path).perms
