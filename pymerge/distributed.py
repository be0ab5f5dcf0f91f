"""Running one merge across the processes of a torch.distributed job (launched by torchrun).

Tensors merge independently, so the work splits by output shard: every rank computes the
same output plan and the same shard-to-rank assignment (`assign_shards`) from it, with no
communication, and writes its own shard files. Only three things cross ranks:

* the status at each step boundary (`Group.check`): one failed rank fails every rank, with
  its error, before anything is finalized;
* the model-scope statistics (radix histograms, sign sums, per-tensor sums), reduced with
  exact integer sums or sums in which every slot has one contributor, so the merged output
  is bit-identical to a single-process run;
* the end: rank 0 writes the index and config once every rank's shards are complete.

`gloo` serves CPU ranks and `nccl` GPU ranks (one GPU per rank, cuda:LOCAL_RANK).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch

from pymerge.errors import MergeError

# Room for each rank's error message in a status exchange.
_MESSAGE_BYTES = 1024


def assign_shards(shard_bytes: list[int], world_size: int) -> list[int]:
    """The rank that writes each shard: largest shard first to the least-loaded rank.

    A pure function of the sizes (ties go to the lower shard index and the lower rank), so
    every rank derives the same assignment from the output plan.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owner = [0] * len(shard_bytes)
    for s in sorted(range(len(shard_bytes)), key=lambda i: (-shard_bytes[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[s] = r
        load[r] += shard_bytes[s]
    return owner


class Group:
    """This process's place in the merge: rank, world size and the collectives the engine needs.

    The single-process group (`Group()`) has rank 0 of 1 and no communication at all.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1,
                 comm_device: torch.device | None = None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self.comm_device = comm_device or torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check(self, error: BaseException | None, step: str) -> None:
        """Every rank calls this at the same step boundary: raises if any rank failed.

        The failed rank re-raises its own error; the others raise a MergeError naming it.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        failed = torch.zeros(self.world_size, dtype=torch.int64, device=self.comm_device)
        if error is not None:
            failed[self.rank] = 1
        try:
            dist.all_reduce(failed)
            bad = [r for r, f in enumerate(failed.tolist()) if f]
            messages = {}
            if bad:
                text = torch.zeros(self.world_size, _MESSAGE_BYTES, dtype=torch.uint8, device=self.comm_device)
                if error is not None:
                    raw = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
                    text[self.rank, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                dist.all_reduce(text)
                for r in bad:
                    row = bytes(text[r].cpu().tolist()).rstrip(b"\0")
                    messages[r] = row.decode("utf-8", "replace")
        except RuntimeError as exc:
            if error is not None:
                raise error from exc
            raise lost_contact(step, exc) from exc
        if error is not None:
            raise error
        if bad:
            r = bad[0]
            others = f" (and rank{'s' if len(bad) > 2 else ''} {', '.join(map(str, bad[1:]))})" if len(bad) > 1 else ""
            raise MergeError(
                f"rank {r} of {self.world_size}{others} failed during {step}: {messages[r]}; "
                "the merge was stopped on every rank and no output was finalized"
            )

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The element-wise sum (or max) of `tensor` over all ranks, on tensor's device."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        t = tensor.to(self.comm_device).contiguous().clone()
        try:
            dist.all_reduce(t, op=ops[op])
        except RuntimeError as exc:
            raise lost_contact("a statistics reduction", exc) from exc
        return t.to(tensor.device)

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}" if self.distributed else "single process"


def lost_contact(step: str, exc: BaseException) -> MergeError:
    return MergeError(
        f"lost contact with another rank during {step} (it died or was killed): {exc}; "
        "no output was finalized"
    )


_created = False


def join(device: str, timeout_s: float | None = None) -> Group:
    """The Group of this process in the torch.distributed job it runs in.

    Uses the default process group when the caller has set one up; otherwise starts one from
    the environment torchrun provides (RANK, WORLD_SIZE, MASTER_ADDR, ...), with nccl for a
    CUDA device and gloo for the CPU.
    """
    global _created
    import torch.distributed as dist

    if not dist.is_available():
        raise MergeError("distributed merge: this torch build has no torch.distributed")
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MergeError(
                "distributed merge: launch it with torchrun (e.g. `torchrun --nproc-per-node 2 -m pymerge.cli merge "
                f"CONFIG OUT --distributed`); {', '.join(missing)} not set"
            )
        backend = "nccl" if cuda else "gloo"
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, **kwargs)
        _created = True
        atexit.register(_destroy)
    backend = dist.get_backend()
    if cuda and backend != "nccl":
        raise MergeError(f"distributed merge on {device}: the process group uses {backend}, not nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(rank, world, local_rank, local_world, comm)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
