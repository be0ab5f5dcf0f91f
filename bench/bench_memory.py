"""Peak memory is set by the largest tensors, not by the model: merge one family at L and 2L layers.

    python bench/bench_memory.py [--layers 8] [--hidden 1024] [--method ties]

Each merge runs in a fresh process; its peak RSS (VmHWM, which unlike ru_maxrss
starts anew at exec) is compared. The
model at 2L layers is twice the bytes; a streaming engine's peak grows by far
less than that (the target is < 10%).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPARSE = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")

CHILD = r"""
import json, sys, time
import pymerge
from pymerge.synthetic import llama_family
if sys.argv[1] == "build":
    llama_family(*json.loads(sys.argv[2])[:1], **json.loads(sys.argv[2])[1])
    sys.exit()
cfg = json.loads(sys.argv[2])
t = time.perf_counter()
rep = pymerge.merge(cfg, sys.argv[3], quiet=True)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": hwm * 1024, "bytes_read": rep.bytes_read,
                  "backends": rep.backends}))
"""


def _child(*argv: str) -> str:
    # Each step in its own process: this one never holds the models, so nothing it
    # allocated can show in the measured process.
    return subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, text=True).stdout


def run(layers: int, args, root: Path) -> dict:
    fam = root / f"L{layers}"
    shape = dict(n_models=3, layers=layers, hidden=args.hidden, intermediate=args.hidden * 11 // 4,
                 heads=args.hidden // 64, kv_heads=max(1, args.hidden // 256), vocab=8000, shards=4)
    _child("build", json.dumps([str(fam), shape]))
    cfg = {
        "merge_method": args.method,
        "base_model": str(fam / "base"),
        "models": [{"model": str(fam / f"model_{i}"), "parameters": {"density": 0.5} if args.method in SPARSE else {}}
                   for i in range(3)],
    }
    return json.loads(_child("merge", json.dumps(cfg), str(root / f"out{layers}")).strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--method", default="ties")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = run(args.layers, args, Path(tmp))
        big = run(2 * args.layers, args, Path(tmp))
    growth = big["peak_rss"] / small["peak_rss"] - 1
    print(f"# peak RSS, {args.method}, base + 3 models, bf16, hidden {args.hidden}; {platform.node()} "
          f"({platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d')}")
    print("| layers | input bytes | peak RSS | seconds |")
    print("|---|---|---|---|")
    for layers, r in ((args.layers, small), (2 * args.layers, big)):
        print(f"| {layers} | {r['bytes_read'] / 2**20:.0f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | {r['seconds']:.2f} |")
    print(f"\npeak RSS growth for 2x the model: {growth * 100:+.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
