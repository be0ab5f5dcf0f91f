"""Run under torchrun by test_distributed.py: merges every job of a JSON file with distributed=True.

argv: JOBS.json [FAULT_RANK FAULT_KIND]. FAULT_KIND "raise" makes that rank's writer fail on its
first tensor, "kill" makes the rank SIGKILL itself there (a crashed process).
"""

import json
import os
import signal
import sys

import pymerge
from pymerge.io.writer import CheckpointWriter


def inject(kind: str) -> None:
    def faulty_add(self, name, tensor):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(f"injected fault while writing {name}")

    CheckpointWriter.add = faulty_add


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    rank = int(os.environ["RANK"])
    if len(sys.argv) > 2 and int(sys.argv[2]) == rank:
        inject(sys.argv[3])
    for job in jobs:
        report = pymerge.merge(job["config"], job["out"], distributed=True, out_shard_size=job["shard"])
        with open(f"{job['out']}.rank{rank}.json", "w") as f:
            json.dump({"tensors": report.tensors, "bytes_written": report.bytes_written,
                       "world_size": report.world_size}, f)


if __name__ == "__main__":
    main()
