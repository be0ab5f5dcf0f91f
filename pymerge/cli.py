"""The command line: argument parsing only; the work is done by the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pymerge.errors import MergeError


def _size(text: str) -> int:
    from pymerge.config import parse_size

    return parse_size(text)


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pymerge", description="Merge models fast, streaming tensor by tensor.")
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the models a (mergekit-style) YAML config names")
    m.add_argument("config", help="the YAML config")
    m.add_argument("out", help="the output folder")
    m.add_argument("--device", help="cpu, cuda or cuda:N (overrides the config)")
    m.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda", "triton"], help="kernel backend (overrides the config)")
    m.add_argument("--out-shard-size", type=_size, help="largest output shard, e.g. 5GB (default 5GB)")
    m.add_argument("--allow-nonfinite", action="store_true", default=None, help="merge inputs holding NaN/Inf")
    m.add_argument("--overwrite", action="store_true", help="replace a finished checkpoint in OUT")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    m.add_argument("--distributed", action="store_true",
                   help="under torchrun: every rank merges and writes a share of the output (gloo on CPU, nccl on GPUs)")

    e = sub.add_parser("emr", help="EMR-Merging folders")
    esub = e.add_subparsers(dest="emr_command", required=True)
    r = esub.add_parser("reconstruct", help="write one task's checkpoint from an EMR folder")
    r.add_argument("emr_dir")
    r.add_argument("--task", type=int, required=True, help="task index (0-based, in the config's model order)")
    r.add_argument("dest")
    r.add_argument("--out-shard-size", type=_size, default=5 * 10**9)
    r.add_argument("--overwrite", action="store_true")

    a = sub.add_parser("align", help="match B's hidden units to A's (weight matching) and save the permutations")
    a.add_argument("a", help="the reference model (usually the merge's base)")
    a.add_argument("b", help="the model to put in A's coordinates")
    a.add_argument("out", help="the permutation file to write (.safetensors)")
    a.add_argument("--arch", choices=["llama", "gpt2", "bert", "mlp"], help="architecture (default: from config.json)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-sweeps", type=int, default=100)

    # inspect and quality define their arguments in pymerge.analysis (torch, numpy):
    # imported only when one of them is the command, so other commands start fast.
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    command = words[0] if words else None
    i = sub.add_parser("inspect", help="task-vector statistics of models against a base, streamed")
    q = sub.add_parser("quality", help="merge quality of every method on a multi-task digits benchmark")
    if command == "inspect":
        from pymerge.analysis.inspect_models import add_inspect_arguments

        add_inspect_arguments(i)
    elif command == "quality":
        from pymerge.analysis.quality import add_quality_arguments

        add_quality_arguments(q)

    d = sub.add_parser("demo", help="merge a built-in synthetic model family with several methods")
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "triton"])
    d.add_argument("--workdir", help="keep the models and outputs here instead of a temporary folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command == "merge":
            from pymerge.engine import merge

            overrides = {k: getattr(args, k) for k in ("device", "backend", "out_shard_size", "allow_nonfinite")}
            overrides = {k: v for k, v in overrides.items() if v is not None}
            report = merge(args.config, args.out, overwrite=args.overwrite, quiet=args.quiet,
                           distributed=args.distributed, **overrides)
            print(report)
        elif args.command == "emr":
            from pymerge.emr import reconstruct

            out = reconstruct(args.emr_dir, args.task, args.dest, max_shard_bytes=args.out_shard_size, overwrite=args.overwrite)
            print(f"wrote task {args.task} to {out}")
        elif args.command == "align":
            from pymerge.align import align_checkpoints

            result = align_checkpoints(args.a, args.b, args.out, arch=args.arch, seed=args.seed, max_sweeps=args.max_sweeps)
            print(f"wrote {args.out}: {len(result.perms)} permutations, {result.sweeps} sweeps "
                  f"({'converged' if result.converged else 'sweep limit'}), objective "
                  f"{result.objective_history[0]:.6g} -> {result.objective_history[-1]:.6g}, {result.seconds:.1f} s")
        elif args.command == "inspect":
            from pymerge.analysis.inspect_models import run_inspect

            return run_inspect(args)
        elif args.command == "quality":
            from pymerge.analysis.quality import run_quality_cli

            return run_quality_cli(args)
        elif args.command == "demo":
            from pymerge.demo import run_demo

            print(run_demo(args.workdir, backend=args.backend))
    except (MergeError, IndexError, OSError, ValueError) as exc:
        print(f"pymerge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console entry point: main(), then an immediate exit.

    When main() returns, every file it wrote is closed and synced; what is left is the
    interpreter's teardown of torch, ~0.4 s of a 3 s merge on a small machine, which
    os._exit skips. A process in a distributed group exits normally, so that the group
    is torn down in order.
    """
    # numpy's OpenBLAS starts a spinning thread per core when torch imports numpy; no
    # command does BLAS work through numpy, and those threads would take cores from the merge.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
