"""End-to-end merge on a GPU from host memory, against the measured pinned host-to-device bandwidth.

    python bench/gpu_e2e.py [--root /dev/shm/pymerge-e2e] [--layers 16] [--hidden 2048] [--out table.md]

Builds a synthetic Llama-shaped family (base + 3 fine-tunes, bf16) in a memory-backed folder,
so the disk is out of the picture, then merges it with `--device cuda` for several methods and
backends. Reported per run (median of --reps): seconds, input GB/s (every input byte read
once per pass), and that rate as a % of the pinned host-to-device copy bandwidth measured
first with CUDA events. The merge is I/O bound when it streams at the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import pymerge
from pymerge.synthetic import llama_family

METHODS = {
    "linear": ({}, {}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "ties": ({"density": 0.3}, {}),
    "dare_ties": ({"density": 0.3}, {}),
    "emr": ({}, {}),
}


def pinned_h2d_gbs(nbytes: int = 1 << 30, reps: int = 10) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/dev/shm/pymerge-e2e")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["auto", "triton", "torch"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out")
    args = p.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    fam = llama_family(root / "family", n_models=3, layers=args.layers, hidden=args.hidden,
                       intermediate=args.hidden * 11 // 4, heads=args.hidden // 128, kv_heads=max(1, args.hidden // 512),
                       vocab=32000, shards=4)
    h2d = pinned_h2d_gbs()
    rows = []
    try:
        for method in args.methods:
            per_model, params = METHODS[method]
            cfg = {"merge_method": method, "base_model": str(fam.base),
                   "models": [{"model": str(m), "parameters": dict(per_model)} for m in fam.models],
                   "parameters": dict(params)}
            for backend in args.backends:
                runs = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    rep = pymerge.merge(cfg, root / "out", device="cuda", backend=backend, overwrite=True)
                    torch.cuda.synchronize()
                    runs.append((time.perf_counter() - t, rep))
                seconds = statistics.median(r[0] for r in runs)
                rep = runs[-1][1]
                gbs = rep.bytes_read / seconds / 1e9
                rows.append(f"| {method} | {backend} ({', '.join(sorted(rep.backends))}) | {seconds:.2f} | "
                            f"{rep.bytes_read / 1e9:.2f} | {gbs:.1f} | {100 * gbs / h2d:.0f}% |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = "\n".join([
        f"# End-to-end GPU merge from host memory — {time.strftime('%Y-%m-%d')}",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; pinned host-to-device copy "
        f"{h2d:.1f} GB/s (CUDA events, 1 GiB). Family: base + 3 fine-tunes, {args.layers} layers, hidden "
        f"{args.hidden}, bf16, in {args.root}. Median of {args.reps}.",
        "",
        "| method | backend (ran) | s | GB read | GB/s | % of pinned H2D |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    print(json.dumps({"h2d_gbs": h2d}))


if __name__ == "__main__":
    main()
