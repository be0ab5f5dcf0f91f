"""The built-in example: a synthetic Llama-shaped family merged with several methods."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pymerge.engine import merge
from pymerge.io import CheckpointReader
from pymerge.synthetic import llama_family

# (method, parameters shared by every model, top-level parameters)
RECIPES = [
    ("linear", {"weight": 1.0}, {}),
    ("task_arithmetic", {"weight": 1.0}, {"lambda": 0.5}),
    ("ties", {"weight": 1.0, "density": 0.3}, {}),
    ("dare_ties", {"weight": 1.0, "density": 0.5}, {}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": 0.01}, {"lambda": 0.5}),
    ("slerp", {}, {"t": 0.5}),
    ("pcb", {}, {"density": 0.2}),
    ("emr", {}, {}),
]


def _relative_change(out: Path, base: Path, emr: bool) -> float:
    """||merged - base|| / ||base|| over all tensors (for EMR: of the unified task vector)."""
    num = den = 0.0
    with CheckpointReader(out) as o, CheckpointReader(base) as b:
        for name in b.names():
            ref = b.get(name).float()
            diff = o.get(f"u:{name}").float() if emr else o.get(name).float() - ref
            num += float(diff.double().pow(2).sum())
            den += float(ref.double().pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def run_demo(workdir: str | Path | None = None, *, backend: str = "auto", quiet: bool = True) -> str:
    """Build the family, merge it with every recipe and return the table as text."""
    with tempfile.TemporaryDirectory(prefix="pymerge-demo-") as tmp:
        root = Path(workdir or tmp)
        family = llama_family(root / "models", n_models=3, layers=4, hidden=128, intermediate=344, vocab=1000)
        params_each = _param_count(family)
        rows = []
        for method, per_model, params in RECIPES:
            models = [family.models[0]] if method == "slerp" else family.models
            cfg = {
                "merge_method": method,
                "base_model": str(family.base),
                "models": [{"model": str(m), "parameters": dict(per_model)} for m in models],
                "parameters": params,
                "dtype": "bfloat16",
                "backend": backend,
            }
            rep = merge(cfg, root / "out" / method, quiet=quiet, overwrite=True)
            change = _relative_change(root / "out" / method, family.base, method == "emr")
            used = ",".join(sorted(rep.backends)) or "-"
            rows.append((method, f"{rep.seconds * 1e3:.0f}", f"{rep.bytes_read / 1e6:.1f}",
                         f"{rep.bytes_read / rep.seconds / 1e9:.2f}", used, f"{change:.4f}"))
    header = ("method", "ms", "MB read", "GB/s", "backend", "|out-base|/|base|")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [
        f"3 fine-tunes of a 4-layer Llama-shaped bf16 model ({params_each} parameters each), torch {torch.__version__}",
        fmt.format(*header),
        fmt.format(*("-" * w for w in widths)),
    ]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def _param_count(family) -> str:
    with CheckpointReader(family.base) as r:
        n = sum(r.nbytes(name) // 2 for name in r.names())
    return f"{n / 1e6:.1f}M"
