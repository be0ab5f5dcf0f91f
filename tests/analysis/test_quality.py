"""The merge-quality benchmark: a reduced run checks the table; the full run is `slow`."""

import copy
import time

import pytest

from pymerge.analysis import quality
from pymerge.io import CheckpointReader

REFERENCE_ROWS = ["fine-tuned (each task)", "output ensemble", "linear probe (frozen base)"]
MERGE_ROWS = ["average", "task arithmetic", "TIES", "DARE + TA", "DARE-TIES", "EMR", "PCB"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quality")
    t0 = time.perf_counter()
    result = quality.run_quality(quality.quick_config(), workdir=workdir)
    return result, workdir, time.perf_counter() - t0


def test_quick_run_is_quick(quick):
    result, _, seconds = quick
    assert seconds < 30
    assert result.seconds <= seconds


def test_table_structure(quick):
    result, _, _ = quick
    (res,) = result.regimes
    assert res.tasks == ["rot90", "perm", "mirror"]
    assert [r.label for r in res.rows] == REFERENCE_ROWS + MERGE_ROWS
    for r in res.rows:
        assert len(r.test) == len(r.val) == 3
        assert all(0.0 <= a <= 1.0 for a in r.test)
    for r in res.merges():
        assert r.seconds is not None and r.seconds > 0
    assert all(r.seconds is None for r in res.rows[:3])
    text = result.format()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "settings", "rot90", "perm", "mirror", "avg", "normalized", "merge s"]
    for label in REFERENCE_ROWS + MERGE_ROWS:
        assert any(line.startswith(f"| {label} ") for line in text.splitlines()), label
    assert "‖τ‖/‖θ0‖" in text and "Pairwise cosine" in text and "Findings" in text
    assert len(res.findings()) == 3
    assert len(res.relative_norms) == 3 and res.cosine.shape == (3, 3)
    assert res.normalized(res.finetuned) == pytest.approx(1.0)


def test_merged_models_beat_chance(quick):
    result, _, _ = quick
    (res,) = result.regimes
    chance = 0.1  # 10-way tasks
    for r in res.rows:
        assert min(r.test) > chance + 0.3, (r.label, r.test)
    # fine-tuning helps over the probe, and each task's fine-tune is the reference
    assert res.finetuned.avg > res.row("linear probe (frozen base)").avg


def test_checkpoints_hold_the_body_only(quick):
    """Heads differ per task: they never enter the merged checkpoints."""
    _, workdir, _ = quick
    for folder in ["base", "task0", "task1", "task2"]:
        with CheckpointReader(workdir / "regime0" / folder) as r:
            assert sorted(r.names()) == ["layers.0.bias", "layers.0.weight", "layers.1.bias", "layers.1.weight"]


def test_cli_plumbing(quick, monkeypatch, tmp_path, capsys):
    result, _, _ = quick
    seen = {}

    def fake(cfg, workdir=None, log=None):
        seen["cfg"] = cfg
        r = copy.copy(result)
        r.config = copy.copy(result.config)
        r.config.seed = cfg.seed
        return r

    monkeypatch.setattr(quality, "run_quality", fake)
    out = tmp_path / "q.md"
    assert quality.main_quality(["--quick", "--seed", "3", "--backend", "torch", "--out", str(out), "-q"]) == 0
    assert seen["cfg"].name == "quick" and seen["cfg"].seed == 3 and seen["cfg"].backend == "torch"
    printed = capsys.readouterr().out
    assert printed.strip() == out.read_text().strip()
    assert "| method" in printed
    # several seeds: one table each and a summary
    seen.clear()
    assert quality.main_quality(["--quick", "--seed", "0", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "## Over seeds 0, 1" in printed
    assert "reproduced with" in printed


@pytest.mark.slow
def test_full_run():
    t0 = time.perf_counter()
    result = quality.run_quality(quality.default_config())
    seconds = time.perf_counter() - t0
    assert seconds < 120
    assert len(result.regimes) == 2
    small, large = result.regimes
    assert [r.label for r in small.rows] == REFERENCE_ROWS + MERGE_ROWS
    assert max(small.relative_norms) < min(large.relative_norms) or sum(small.relative_norms) < sum(large.relative_norms)
    for res in result.regimes:
        assert len(res.tasks) == 5
        for r in res.rows:
            assert min(r.test) > 0.2, (res.regime.name, r.label, r.test)
        assert len(res.findings()) == 3
    text = result.format()
    assert text.count("### Regime") == 2
