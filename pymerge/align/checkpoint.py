"""Checkpoint-level entry points: align two checkpoints, merge with saved permutations.

Both stream through CheckpointReader (one tensor at a time) and, for the merge,
CheckpointWriter; they are what ``pymerge align`` and a permutation-aware merge
call.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pymerge.align.apply import iter_aligned_average, load_permutation_file, save_permutations
from pymerge.align.matching import MatchResult, weight_matching
from pymerge.align.spec import PermutationSpec, spec_from_config
from pymerge.io import CheckpointReader, CheckpointWriter

__all__ = ["align_checkpoints", "merge_with_permutations"]


def _spec_for(reader: CheckpointReader, arch: str | None, spec: PermutationSpec | None,
              spec_options: Mapping[str, Any] | None) -> PermutationSpec:
    if spec is not None:
        return spec
    config = reader.config()
    if config is None:
        raise ValueError(f"{reader.path}: no config.json to build the permutation spec from; pass spec=")
    return spec_from_config(config, arch, **dict(spec_options or {}))


def align_checkpoints(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike, *, arch: str | None = None,
                      spec: PermutationSpec | None = None, spec_options: Mapping[str, Any] | None = None,
                      max_sweeps: int = 100, seed: int = 0, order: str = "streaming", cache: bool | None = None,
                      device: str = "cpu") -> MatchResult:
    """Weight-match checkpoint B to A and save the permutations (with the spec) to ``out``.

    The saved set puts B in A's coordinates: merge it with A as base and B as
    the other model (``merge_with_permutations``). ``order="streaming"`` reads
    each checkpoint about twice per sweep; ``cache=True`` keeps every tensor in
    memory (fp64) instead.
    """
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        spec = _spec_for(ra, arch, spec, spec_options)
        result = weight_matching(spec, ra, rb, max_sweeps=max_sweeps, seed=seed, order=order, cache=cache,
                                 device=device)
    save_permutations(out, result.perms, spec=spec, metadata={
        "method": "weight_matching", "a": str(a), "b": str(b), "seed": seed, "sweeps": result.sweeps,
        "converged": result.converged, "objective": result.objective_history[-1],
        "objective_initial": result.objective_history[0],
    })
    return result


def merge_with_permutations(base: str | os.PathLike, others: Sequence[str | os.PathLike],
                            permutations: Sequence[str | os.PathLike | None], out: str | os.PathLike, *,
                            coeffs: Sequence[float] | None = None, normalize_coverage: bool = False,
                            out_dtype: torch.dtype | None = None, backend: str = "auto",
                            max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> Path:
    """Write c_0 * base + sum_i c_i * pi_i(other_i), pi_i read from permutation files (None: identity).

    Each output tensor is one permute_average call; the base's config and tokenizer files are copied.
    """
    if len(permutations) != len(others):
        raise ValueError(f"{len(permutations)} permutation files for {len(others)} models")
    files = [None if p is None else load_permutation_file(p) for p in permutations]
    specs = [f.spec for f in files if f is not None and f.spec is not None]
    readers = [CheckpointReader(base)] + [CheckpointReader(o) for o in others]
    try:
        spec = specs[0] if specs else _spec_for(readers[0], None, None, None)
        rb = readers[0]
        plan = []
        for name in rb.names():
            dt = rb.dtype(name)
            if out_dtype is not None and dt.is_floating_point:
                dt = out_dtype
            plan.append((name, rb.shape(name), dt))
        h = hashlib.sha256(json.dumps({
            "base": str(base), "others": [str(o) for o in others], "perms": [str(p) for p in permutations],
            "coeffs": list(coeffs) if coeffs is not None else None, "norm": normalize_coverage,
        }, sort_keys=True).encode()).hexdigest()
        writer = CheckpointWriter(out, plan, max_shard_bytes=max_shard_bytes, fingerprint=h, overwrite=overwrite)
        done = writer.completed_names()
        names = [n for n in rb.names() if n not in done]
        try:
            for name, t in iter_aligned_average(rb, readers[1:], [None if f is None else f.perms for f in files], coeffs,
                                                spec=spec, names=names, normalize_coverage=normalize_coverage,
                                                out_dtype=out_dtype, backend=backend):
                writer.add(name, t)
            writer.finalize(rb.config(), rb.files_to_copy())
        except BaseException:
            writer.abort()
            raise
    finally:
        for r in readers:
            r.close()
    return Path(out)
