"""Distributed merges under torchrun (gloo, CPU): bit-identical to one process, and failures stop every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pymerge
import pymerge.errors
from pymerge.distributed import assign_shards
from pymerge.io import CheckpointReader

from .test_merge import PER_TENSOR, _config

WORKER = Path(__file__).with_name("dist_worker.py")
# Below the distributed cap (total / (4 x ranks)) for 2 and 3 ranks on the test family, so
# the shard layout, and hence every file, is that of the single-process run.
SHARD = 2500


def _configs(family):
    out = {}
    for method, (per_model, params, _) in PER_TENSOR.items():
        cfg = _config(family, method, params=params, seed=7)
        for i, m in enumerate(cfg["models"]):
            m["parameters"] = per_model(i)
        out[method] = cfg
    out["slerp"] = _config(family, "slerp", params={"t": 0.3}, models=[family.base, family.models[1]])
    out["ties_model"] = _config(family, "ties", per_model={"density": 0.4}, params={"scope": "model"})
    out["pcb_model"] = _config(family, "pcb", params={"density": 0.2, "clip_ratio": 0.05})
    out["emr"] = _config(family, "emr", params={"rescale_scope": "tensor_mean_sum"})
    out["emr_model"] = _config(family, "emr", params={"rescale_scope": "model"})
    return out


def _torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _files(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def single(family, tmp_path_factory):
    """Every config merged by one process (the expected output)."""
    root = tmp_path_factory.mktemp("single")
    configs = _configs(family)
    for label, cfg in configs.items():
        pymerge.merge(cfg, root / label, out_shard_size=SHARD)
    return configs, root


@pytest.mark.parametrize("nproc", [2, 3])
def test_every_method_is_bit_identical_to_one_process(single, tmp_path, nproc):
    configs, expected = single
    jobs = []
    for label, cfg in configs.items():
        path = tmp_path / f"{label}.yml"
        path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
        jobs.append({"config": str(path), "out": str(tmp_path / label), "shard": SHARD})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run = _torchrun(nproc, WORKER, tmp_path / "jobs.json")
    assert run.returncode == 0, run.stderr[-4000:]
    for label in configs:
        got, want = _files(tmp_path / label), _files(expected / label)
        assert sorted(got) == sorted(want), label
        for name in want:
            assert got[name] == want[name], f"{label}: {name} differs from the single-process output"
        with CheckpointReader(tmp_path / label) as r:  # one checkpoint, whatever rank wrote a shard
            assert set(r.names()) == set(CheckpointReader(expected / label).names())
        reports = [json.loads((tmp_path / f"{label}.rank{k}.json").read_text()) for k in range(nproc)]
        assert all(rep["world_size"] == nproc and rep["tensors"] > 0 for rep in reports), (label, reports)
        assert not (tmp_path / label / ".pymerge-partial").exists()


def test_cli_under_torchrun(family, single, tmp_path):
    configs, expected = single
    cfg = tmp_path / "ties.yml"
    cfg.write_text(json.dumps(configs["ties_model"]))
    run = _torchrun(2, "-m", "pymerge.cli", "merge", cfg, tmp_path / "out", "--distributed", "--out-shard-size", SHARD)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "rank 0/2: merged" in run.stdout and "rank 1/2: merged" in run.stdout
    assert _files(tmp_path / "out") == _files(expected / "ties_model")


def _looks_finished(folder):
    return [f.name for f in folder.iterdir() if f.is_file()] if folder.exists() else []


@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_a_failed_rank_fails_the_run_and_finalizes_nothing(single, tmp_path, kind):
    configs, expected = single
    path = tmp_path / "ties.yml"
    path.write_text(json.dumps(configs["ties_model"]))
    out = tmp_path / "out"
    (tmp_path / "jobs.json").write_text(json.dumps([{"config": str(path), "out": str(out), "shard": SHARD}]))
    run = _torchrun(2, WORKER, tmp_path / "jobs.json", 1, kind, timeout=240)
    assert run.returncode != 0
    log = run.stdout + run.stderr
    if kind == "raise":
        # the failed rank's own error, and the other rank naming it
        assert "OSError: injected fault while writing" in log
        assert "rank 1 of 2 failed during the merge pass" in log
    else:
        assert "Signal 9 (SIGKILL)" in log or "exitcode  : -9" in log, log[-3000:]
    assert _looks_finished(out) == [], "a failed distributed run left files that look like a checkpoint"
    # the same job again resumes from the shards that were completed and finishes the checkpoint
    rerun = _torchrun(2, WORKER, tmp_path / "jobs.json")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert _files(out) == _files(expected / "ties_model")


def test_shard_assignment_balances_bytes_deterministically():
    sizes = [5, 1, 1, 1, 1, 1, 3, 3]
    owner = assign_shards(sizes, 2)
    assert owner == assign_shards(list(sizes), 2)
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert sorted(load) == [8, 8]
    assert assign_shards([], 3) == []
    assert assign_shards([7], 3) == [0]
    with pytest.raises(ValueError):
        assign_shards([1], 0)


def test_distributed_without_torchrun_says_how_to_launch(family, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = _config(family, "linear")
    with pytest.raises(pymerge.errors.MergeError, match="launch it with torchrun"):
        pymerge.merge(cfg, tmp_path / "out", distributed=True)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_nccl_ranks_on_gpus_write_the_cpu_bytes(single, tmp_path):
    import torch

    configs, expected = single
    nproc = min(2, torch.cuda.device_count())  # one GPU per rank
    jobs = []
    for label in ("linear", "ties_model", "dare_ties"):
        path = tmp_path / f"{label}.yml"
        path.write_text(json.dumps({**configs[label], "device": "cuda"}))
        jobs.append({"config": str(path), "out": str(tmp_path / label), "shard": SHARD})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run = _torchrun(nproc, WORKER, tmp_path / "jobs.json")
    assert run.returncode == 0, run.stderr[-4000:]
    for label in ("linear", "ties_model", "dare_ties"):
        assert _files(tmp_path / label) == _files(expected / label), label
