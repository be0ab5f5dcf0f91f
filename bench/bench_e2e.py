"""End to end: `pymerge merge` against `mergekit-yaml` on a synthetic Llama-shaped family.

    python bench/bench_e2e.py                                   # pymerge only
    python bench/bench_e2e.py --mergekit-venv /tmp/mk --out bench/results/e2e.md
    MERGEKIT_VENV=/tmp/mk python bench/bench_e2e.py --workdir /tmp/e2e   # keep (and reuse) the family

A base and 3 fine-tunes (~167M parameters each with the defaults: 9 layers,
hidden 1024, intermediate 2816, 16 heads, 4 kv heads, vocab 32000; bf16, 4
shards) are built in a child process, so this process never holds a model.
Each method (linear, ties with density 0.5, dare_ties with density 0.5) is
merged from one YAML config by both command lines, each run in a fresh
process, and reported as:

- wall time: seconds from starting the command to its exit (interpreter start,
  imports, reading, merging, writing), median of up to --repeats runs after
  --warmup untimed ones (default 1: the first run after the other tool pays for
  the memory that tool just freed); runs stop early when another would pass
  --budget-s for that method and tool (the "runs" column says how many were timed);
- peak RSS: the child's maximum resident set size (GNU time -v, else VmHWM
  polled from /proc), the largest over its runs;
- speed-up: mergekit's median wall time / pymerge's (a run still going after
  --timeout-s is killed; the table then gives a bound).

The outputs of the last runs are then compared tensor by tensor (in a child
process): max |difference|, max distance in bf16 ulps, the fraction of elements
that differ, and the relative L2 difference ||pymerge - mergekit|| / ||mergekit||.
Linear should agree to bf16 rounding (<= 1 ulp); ties agrees up to elements
tied at the trim threshold (the two tools break ties differently); dare_ties
draws its masks from different random generators, so only the relative
difference is meaningful: beside it, the relative difference of two pymerge
merges with seeds 0 and 1 (one more, untimed, pymerge run) shows what masks
alone account for.

The configs set `dtype: float32` and `out_dtype: bfloat16` so that both tools
compute in fp32 and write bf16 (pymerge always accumulates in fp32; mergekit
computes in `dtype`). --compute-dtype bfloat16 writes `dtype: bfloat16` instead.
Inputs are read from the page cache (the family was just written), the same
for both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("linear", "ties", "dare_ties")
DENSITY = 0.5

BUILD = r"""
import json, sys, time
from pymerge.synthetic import llama_family
root, shape = sys.argv[1], json.loads(sys.argv[2])
t = time.perf_counter()
llama_family(root, **shape)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

COMPARE = r"""
import json, math, sys
from pathlib import Path
import torch
from safetensors import safe_open

def files(folder):
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {n: folder / f for n, f in wm.items()}
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: f for n in h.keys()})
    return out

def ordered(x):
    # bf16 bit patterns as integers whose differences count ulps (+0 and -0 both 0)
    i = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)

def load(fmap, n):
    with safe_open(str(fmap[n]), "pt") as h:
        return h.get_tensor(n)

a_files, b_files = files(sys.argv[1]), files(sys.argv[2])
# ties: the family and the density, to tell differences at the trim threshold from any other
fam, density = (Path(sys.argv[3]), float(sys.argv[4])) if len(sys.argv) > 4 else (None, None)
if fam is not None:
    in_files = [files(fam / "base")] + [files(fam / f"model_{i}") for i in range(3)]
common = [n for n in b_files if n in a_files]
res = {"tensors": len(common), "only_pymerge": sorted(set(a_files) - set(b_files)),
       "only_mergekit": sorted(set(b_files) - set(a_files)), "max_abs": 0.0, "max_ulps": 0,
       "differing": 0, "numel": 0, "sq_diff": 0.0, "sq_ref": 0.0, "worst": None, "dtypes": set(),
       "differing_off_threshold": None if fam is None else 0}
for n in common:
    a, b = load(a_files, n), load(b_files, n)
    if fam is not None and (a != b).any():
        # an element may differ only where some model's |tau| equals its k-th largest |tau| (k = int(density * numel)):
        # which of the tied elements are kept is the tools' own tie-break
        base = load(in_files[0], n).float().reshape(-1)
        at_threshold = torch.zeros(base.numel(), dtype=torch.bool)
        for f in in_files[1:]:
            tau = (load(f, n).float().reshape(-1) - base).abs()
            k = max(1, int(density * tau.numel()))
            at_threshold |= tau == tau.kthvalue(tau.numel() - k + 1).values
        res["differing_off_threshold"] += int(((a != b).reshape(-1) & ~at_threshold).sum().item())
    res["dtypes"].add(f"{a.dtype}/{b.dtype}")
    if a.shape != b.shape:
        raise SystemExit(f"{n}: shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    d = a.float() - b.float()
    m = d.abs().max().item() if d.numel() else 0.0
    if m > res["max_abs"]:
        res["max_abs"], res["worst"] = m, n
    if a.dtype == b.dtype == torch.bfloat16:
        res["max_ulps"] = max(res["max_ulps"], int((ordered(a) - ordered(b)).abs().max().item()) if a.numel() else 0)
    res["differing"] += int((a != b).sum().item())
    res["numel"] += a.numel()
    res["sq_diff"] += float(d.double().pow(2).sum())
    res["sq_ref"] += float(b.double().pow(2).sum())
res["rel_l2"] = math.sqrt(res["sq_diff"]) / max(math.sqrt(res["sq_ref"]), 1e-30)
res["dtypes"] = sorted(res["dtypes"])
print(json.dumps(res))
"""


def family_shape(args) -> dict:
    return dict(n_models=3, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                kv_heads=args.kv_heads, vocab=args.vocab, shards=args.shards)


def param_count(s: dict) -> int:
    h, i, hd = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    layer = 2 * s["heads"] * hd * h + 2 * s["kv_heads"] * hd * h + 3 * i * h + 2 * h
    return 2 * s["vocab"] * h + s["layers"] * layer + h


def build_family(root: Path, shape: dict) -> float | None:
    """Build the family under root (skipped when one of this shape is already there); seconds taken or None."""
    marker = root / "shape.json"
    if marker.exists() and json.loads(marker.read_text()) == shape and (root / "model_2").is_dir():
        return None
    if root.exists():
        shutil.rmtree(root)
    out = subprocess.run([sys.executable, "-c", BUILD, str(root), json.dumps(shape)], check=True,
                         capture_output=True, text=True).stdout
    marker.write_text(json.dumps(shape))
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def write_configs(root: Path, fam: Path, compute_dtype: str) -> dict[str, Path]:
    cfg_dir = root / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    dtype = "dtype: float32\nout_dtype: bfloat16\n" if compute_dtype == "float32" else "dtype: bfloat16\n"
    paths = {}
    for method in METHODS:
        params = "{weight: 1.0}" if method == "linear" else f"{{weight: 1.0, density: {DENSITY}}}"
        lines = [f"merge_method: {method}"]
        if method != "linear":
            lines.append(f"base_model: {fam / 'base'}")
        lines.append("models:")
        for m in range(3):
            lines += [f"  - model: {fam / f'model_{m}'}", f"    parameters: {params}"]
        paths[method] = cfg_dir / f"{method}.yml"
        paths[method].write_text("\n".join(lines) + "\n" + dtype)
    # pymerge only (`seed` is its own key): the same dare_ties with another random stream, the yardstick
    # for how far two dare_ties merges that differ only in their masks lie apart
    paths["dare_ties-seed1"] = cfg_dir / "dare_ties-seed1.yml"
    paths["dare_ties-seed1"].write_text(paths["dare_ties"].read_text() + "seed: 1\n")
    return paths


def _poll_hwm(pid: int, box: dict) -> None:
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        box["kb"] = max(box.get("kb", 0), int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.05)


def timed_run(cmd: list[str], log: Path, timeout: float | None) -> dict:
    """Run cmd: wall seconds, peak RSS bytes, stdout; killed (with its process group) past `timeout` seconds."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    rss_file = log.with_suffix(".time")
    rss_file.unlink(missing_ok=True)
    full = [gnu_time, "-v", "-o", str(rss_file)] + cmd if gnu_time else cmd
    t = time.perf_counter()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    box: dict = {}
    if not gnu_time:
        threading.Thread(target=_poll_hwm, args=(p.pid, box), daemon=True).start()
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGKILL)  # the group this run started: the wrapper and the merge under it
        out, err = p.communicate()
    wall = time.perf_counter() - t
    if gnu_time:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", rss_file.read_text() if rss_file.exists() else "")
        peak = int(m.group(1)) * 1024 if m else None
    else:
        peak = box["kb"] * 1024 if "kb" in box else None
    log.write_text(f"$ {shlex.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    if timed_out:
        return {"seconds": wall, "peak_rss": peak, "stdout": out, "timed_out": True}
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit status {p.returncode}; see {log}\n{err[-2000:]}")
    return {"seconds": wall, "peak_rss": peak, "stdout": out, "timed_out": False}


def run_tool(name: str, cmd_for, out_dir: Path, logs: Path, args) -> dict:
    """Up to args.repeats timed runs (fewer past args.budget_s); a run past args.timeout_s ends the series."""
    times, peaks, stdout, timed_out = [], [], "", False
    for i in range(args.warmup):
        # Untimed: the first run after the other tool pays for the memory it just freed.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        r = timed_run(cmd_for(out_dir), logs / f"{out_dir.name}-warmup-{i}.log", args.timeout_s)
        print(f"    {name} warm-up run: {r['seconds']:.2f} s", file=sys.stderr, flush=True)
        if r["timed_out"]:
            break
    for i in range(args.repeats):
        if out_dir.exists():
            shutil.rmtree(out_dir)
        r = timed_run(cmd_for(out_dir), logs / f"{out_dir.name}-{i}.log", args.timeout_s)
        peaks.append(r["peak_rss"])
        state = "timed out" if r["timed_out"] else "done"
        print(f"    {name} run {i + 1}: {state} in {r['seconds']:.2f} s, peak RSS "
              f"{r['peak_rss'] / 2**20 if r['peak_rss'] else float('nan'):.0f} MiB", file=sys.stderr, flush=True)
        if r["timed_out"]:
            timed_out = True
            break
        times.append(r["seconds"])
        stdout = r["stdout"]
        if sum(times) + times[-1] > args.budget_s:
            break
    known = [p for p in peaks if p]
    return {"median": statistics.median(times) if times else None, "min": min(times) if times else None,
            "runs": len(times), "times": times, "timed_out": timed_out,
            "peak_rss": max(known) if known else None, "stdout": stdout}


def compare(a: Path, b: Path, ties_family: Path | None = None) -> dict:
    extra = [str(ties_family), str(DENSITY)] if ties_family is not None else []
    out = subprocess.run([sys.executable, "-c", COMPARE, str(a), str(b), *extra], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mergekit_version(venv: Path) -> str:
    try:
        return subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _secs(r: dict, key: str, args) -> str:
    if r[key] is not None:
        return f"{r[key]:.2f}"
    return f"> {args.timeout_s:.0f} (timed out)"


def _speedup(r: dict, mk: dict | None, args) -> str:
    """mergekit's median / this median; a bound when one side timed out."""
    if mk is None:
        return "-"
    if r["median"] is not None and mk["median"] is not None:
        return f"{mk['median'] / r['median']:.2f}x"
    if r["median"] is None and mk["median"] is not None:
        return f"< {mk['median'] / args.timeout_s:.2f}x"
    if r["median"] is not None:
        return f"> {args.timeout_s / r['median']:.2f}x"
    return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=3, help="runs per method and tool (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method and tool before the timed ones")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="no further run of a method and tool once another would pass this many seconds (>= 1 run)")
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="a run still going after this many seconds is killed and reported as timed out")
    p.add_argument("--backend", help="pymerge --backend (default: the engine's auto)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the configs' `dtype` (float32: plus out_dtype bfloat16)")
    p.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV"),
                   help="virtual environment holding mergekit (default: $MERGEKIT_VENV; none: pymerge only)")
    p.add_argument("--workdir", help="keep the family, configs, outputs and logs here (reused when the shape matches)")
    p.add_argument("--out", help="also write the report (markdown) to this file")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")

    mk_bin = None
    if args.mergekit_venv:
        mk_bin = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
        if not mk_bin.exists():
            p.error(f"{mk_bin} not found: is mergekit installed in {args.mergekit_venv}?")

    command = "python " + shlex.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="pymerge-e2e-")
    root = Path(args.workdir or tmp.name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    try:
        shape = family_shape(args)
        fam = root / "family"
        print(f"building the family in {fam} ...", file=sys.stderr, flush=True)
        build_s = build_family(fam, shape)
        configs = write_configs(root, fam, args.compute_dtype)
        input_bytes = sum(f.stat().st_size for f in fam.rglob("*.safetensors"))

        rows, comparisons, backends_used = [], {}, {}
        for method in methods:
            cfg = configs[method]
            print(f"{method}:", file=sys.stderr, flush=True)

            def pm_cmd(out, cfg=cfg):
                cmd = [sys.executable, "-m", "pymerge.cli", "merge", str(cfg), str(out), "--quiet"]
                return cmd + (["--backend", args.backend] if args.backend else [])

            pm = run_tool("pymerge", pm_cmd, root / f"out-pymerge-{method}", logs, args)
            m = re.search(r"backends: (.*?); peak RSS", pm["stdout"])
            backends_used[method] = m.group(1) if m else ("timed out" if pm["timed_out"] else "?")
            rows.append((method, "pymerge", pm))
            if mk_bin:
                def mk_cmd(out, cfg=cfg):
                    return [str(mk_bin), str(cfg), str(out), "--quiet", "--random-seed", "0"]

                mk = run_tool("mergekit", mk_cmd, root / f"out-mergekit-{method}", logs, args)
                rows.append((method, "mergekit", mk))
                if not (pm["timed_out"] or mk["timed_out"]):
                    print("    comparing the outputs ...", file=sys.stderr, flush=True)
                    comparisons[method] = compare(root / f"out-pymerge-{method}", root / f"out-mergekit-{method}",
                                                  fam if method == "ties" else None)
                    if method == "dare_ties":
                        print("    pymerge with seed 1, compared with seed 0 ...", file=sys.stderr, flush=True)
                        other = root / "out-pymerge-dare_ties-seed1"
                        shutil.rmtree(other, ignore_errors=True)
                        r = timed_run(pm_cmd(other, configs["dare_ties-seed1"]), logs / f"{other.name}.log", args.timeout_s)
                        if not r["timed_out"]:
                            comparisons[method]["seed_rel_l2"] = compare(other, root / "out-pymerge-dare_ties")["rel_l2"]
                        shutil.rmtree(other, ignore_errors=True)
                for tool in ("pymerge", "mergekit"):
                    if not args.workdir:
                        shutil.rmtree(root / f"out-{tool}-{method}", ignore_errors=True)
        total = time.perf_counter() - t_start

        params = param_count(shape)
        lines = [
            "# End-to-end merge: pymerge vs mergekit" if mk_bin else "# End-to-end merge: pymerge",
            "",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores; {platform.node()}; Python {platform.python_version()}; "
            f"load average (1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
            f"- command: `{command}`",
            f"- family: base + 3 fine-tunes, Llama-shaped ({shape['layers']} layers, hidden {shape['hidden']}, "
            f"intermediate {shape['intermediate']}, {shape['heads']} heads, {shape['kv_heads']} kv heads, vocab {shape['vocab']}), "
            f"{params / 1e6:.1f}M parameters each, bf16, {shape['shards']} shards; {input_bytes / 2**20:.0f} MiB on disk"
            + ("" if build_s is None else f", built in {build_s:.0f} s"),
            f"- configs: {', '.join(methods)} (weight 1, density {DENSITY}); "
            + ("`dtype: float32`, `out_dtype: bfloat16`" if args.compute_dtype == "float32" else "`dtype: bfloat16`"),
            "- pymerge: `python -m pymerge.cli merge CONFIG OUT --quiet`"
            + (f" `--backend {args.backend}`" if args.backend else "")
            + "; backends that ran: " + "; ".join(f"{m}: {b}" for m, b in backends_used.items()),
        ]
        if mk_bin:
            lines.append(f"- mergekit: `mergekit-yaml CONFIG OUT --quiet --random-seed 0` (mergekit, torch: "
                         f"{mergekit_version(Path(args.mergekit_venv))}; otherwise its defaults, CPU)")
        lines += [f"- wall time: median of up to {args.repeats} runs (fewer when another would pass {args.budget_s:.0f} s; "
                  f"a run is killed after {args.timeout_s:.0f} s), after {args.warmup} untimed run(s) per method and tool; "
                  "peak RSS: GNU time -v (largest over the timed runs); "
                  "inputs in the page cache",
                  f"- total benchmark time: {total:.0f} s", "",
                  "| method | tool | runs | median s | min s | peak RSS MiB | speed-up vs mergekit |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        mk = {m: r for m, tool, r in rows if tool == "mergekit"}
        for method, tool, r in rows:
            lines.append(f"| {method} | {tool} | {r['runs']} | {_secs(r, 'median', args)} | {_secs(r, 'min', args)} "
                         f"| {_mib(r['peak_rss'])} | {_speedup(r, mk.get(method), args)} |")
        if comparisons:
            lines += ["", "Outputs, pymerge vs mergekit (all tensors):", "",
                      "| method | tensors | max abs diff | max bf16 ulps | elements differing | rel. L2 diff | expected |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            expected = {"linear": "<= 1 ulp (bf16 rounding)",
                        "ties": "differences only where a model's abs(tau) ties with its trim threshold",
                        "dare_ties": "different RNGs: relative difference only"}
            for method, c in comparisons.items():
                extra = ""
                if c["only_pymerge"] or c["only_mergekit"]:
                    extra = f" (names only in pymerge: {len(c['only_pymerge'])}, only in mergekit: {len(c['only_mergekit'])})"
                note = expected[method]
                if c["differing_off_threshold"] is not None:
                    note += f": {c['differing_off_threshold']} elements differ elsewhere"
                if "seed_rel_l2" in c:
                    note += f"; pymerge seed 0 vs seed 1: {c['seed_rel_l2']:.3g}"
                lines.append(f"| {method} | {c['tensors']}{extra} | {c['max_abs']:.3g} | {c['max_ulps']} | "
                             f"{100 * c['differing'] / max(c['numel'], 1):.4f}% | {c['rel_l2']:.3g} | {note} |")
            skipped = [m for m in methods if m not in comparisons]
            if skipped:
                lines.append(f"\nNot compared (a run timed out): {', '.join(skipped)}")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"written to {args.out}", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
