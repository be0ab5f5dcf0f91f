"""Scaling of a distributed merge (torchrun, gloo on CPU) from 1 to N processes on this machine.

    python bench/bench_distributed.py [--nprocs 1 2] [--methods linear ties ties_model] [--reps 3]

Builds one synthetic Llama-shaped family (base + 3 fine-tunes), then merges it with
`pymerge.merge(..., distributed=True)` under torchrun with each process count, the counts
interleaved rep by rep so that drift in the machine's load hits them alike. Reported per
method and process count: the median wall time of the merge (the slowest rank, from the
start of the merge to the end of finalize; process start-up excluded, reported apart), each
rank's read throughput, and the speed-up over one process. Prints a markdown table; --out
writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "linear": ({}, {}),
    "ties": ({"density": 0.3}, {}),
    "ties_model": ({"density": 0.3}, {"scope": "model"}),
    "dare_ties": ({"density": 0.3}, {}),
}


def child(cfg_path: str, out: str, result: str) -> None:
    """One rank of one merge (run by torchrun)."""
    import torch.distributed as dist

    import pymerge

    t = time.perf_counter()
    rep = pymerge.merge(cfg_path, out, distributed=True, quiet=True, overwrite=True)
    seconds = time.perf_counter() - t
    Path(f"{result}.rank{rep.rank}").write_text(json.dumps(
        {"seconds": seconds, "bytes_read": rep.bytes_read, "bytes_written": rep.bytes_written, "tensors": rep.tensors}))
    dist.destroy_process_group()


def config(fam: Path, method: str) -> dict:
    per_model, params = METHODS[method]
    name = "ties" if method == "ties_model" else method
    return {
        "merge_method": name,
        "base_model": str(fam / "base"),
        "models": [{"model": str(fam / f"model_{i}"), "parameters": dict(per_model)} for i in range(3)],
        "parameters": dict(params),
    }


def launch(nproc: int, cfg: Path, out: Path, result: Path) -> dict:
    for f in result.parent.glob(result.name + ".rank*"):
        f.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--child", str(cfg), str(out), str(result)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(nproc)]
    merge_s = max(r["seconds"] for r in ranks)
    return {"wall": wall, "merge": merge_s, "ranks": ranks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=["linear", "ties", "ties_model"], choices=list(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    import torch

    from pymerge.synthetic import llama_family

    with tempfile.TemporaryDirectory(prefix="pymerge-dist-bench-") as tmp:
        root = Path(tmp)
        fam = root / "family"
        llama_family(fam, n_models=3, layers=args.layers, hidden=args.hidden, intermediate=args.hidden * 11 // 4,
                     heads=args.hidden // 64, kv_heads=max(1, args.hidden // 256), vocab=8000, shards=4)
        input_bytes = sum(f.stat().st_size for f in fam.rglob("*.safetensors"))
        runs: dict[tuple[str, int], list[dict]] = {}
        for method in args.methods:
            cfg = root / f"{method}.yml"
            cfg.write_text(json.dumps(config(fam, method)))
            for _ in range(args.reps):
                for n in args.nprocs:
                    runs.setdefault((method, n), []).append(launch(n, cfg, root / f"out-{method}-{n}", root / "result"))

        lines = [
            f"# Distributed merge scaling (gloo, CPU) — {time.strftime('%Y-%m-%d')}",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
            f"family: base + 3 fine-tunes, {args.layers} layers, hidden {args.hidden}, bf16, "
            f"{input_bytes / 1e6:.0f} MB of inputs. Median of {args.reps} interleaved runs; each rank runs "
            f"cores / processes kernel threads.",
            "",
            "| method | processes | merge s (median) | speed-up vs 1 | per-rank read GB/s (median per rank) | "
            "start-up + exit s |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for method in args.methods:
            base_s = statistics.median(r["merge"] for r in runs[(method, args.nprocs[0])])
            for n in args.nprocs:
                rs = runs[(method, n)]
                merge_s = statistics.median(r["merge"] for r in rs)
                per_rank = [statistics.median(r["ranks"][k]["bytes_read"] / r["ranks"][k]["seconds"] / 1e9 for r in rs)
                            for k in range(n)]
                overhead = statistics.median(r["wall"] - r["merge"] for r in rs)
                lines.append(f"| {method} | {n} | {merge_s:.2f} | {base_s / merge_s:.2f}x | "
                             f"{', '.join(f'{g:.2f}' for g in per_rank)} | {overhead:.1f} |")
        table = "\n".join(lines) + "\n"
        print(table)
        if args.out:
            Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
