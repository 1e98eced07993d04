"""Integration tests against a real SLURM cluster (slurmctld + slurmd on localhost).

``.ci/run`` starts the cluster with ``scripts/slurm-local.sh up`` and sets BENCH_REQUIRE_SLURM=1,
so in CI these tests fail rather than skip when the cluster is missing.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import LEXICON_FAST

from bench.cli import main
from bench.harness.launch import load_registry, sweep_status
from bench.harness.runner import Cell, record_path, run_cell

pytestmark = pytest.mark.slow


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not cluster_up():
        if os.environ.get("BENCH_REQUIRE_SLURM") == "1":
            pytest.fail("BENCH_REQUIRE_SLURM=1 but no SLURM cluster answers (scripts/slurm-local.sh up)")
        pytest.skip("no SLURM cluster (start one with: sudo scripts/slurm-local.sh up)")


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def records(cells, root):
    return {c: json.loads(record_path(c, root).read_text()) for c in cells if record_path(c, root).exists()}


LINEAR_FAST = ("train.iterations=20", "train.eval_every=10", "task.n=64", "task.n_test=64", "task.n_val=32")


def test_sweep_on_slurm_returns_at_once_and_every_record_appears(tmp_path, capsys):
    sweep = tmp_path / "mini.yaml"
    sweep.write_text(
        "task: linear\nmethods: [rebel, chi2-rebel]\nseeds: [0, 1]\nradii: {chi2-rebel: [0.01, 0.5]}\n"
        f"overrides: {list(LINEAR_FAST)}\n"
        "slurm: {cpus_per_task: 1, mem_gb: 2, time_min: 10, max_running: 2, array_limit: 4}\n"
    )
    start = time.time()
    assert main(["run", "--sweep", str(sweep), "--cluster", "slurm", "--results", str(tmp_path / "r")]) == 0
    assert time.time() - start < 30, "launching must not wait for the jobs"
    out = capsys.readouterr().out
    assert "submitted 6 cells" in out
    registry = load_registry(tmp_path / "r" / ".sweeps" / "mini")
    assert len(registry) == 6 and all(v["cluster"] == "slurm" for v in registry.values())
    arrays = sorted({v["job_id"].split("_")[0] for v in registry.values()})
    assert len(arrays) == 2, "6 cells under an array limit of 4 make two arrays"
    scripts = sorted((tmp_path / "r" / ".sweeps" / "mini" / "submitit").glob("*/*_submission.sh"))
    headers = {line for p in scripts for line in p.read_text().splitlines() if "--array" in line}
    assert headers == {"#SBATCH --array=0-3%2", "#SBATCH --array=0-1%2"}
    rows = wait_for(
        lambda: (
            (rows := sweep_status(tmp_path / "r", "mini"))
            and all(s == "completed" for _, s, _ in rows)
            and rows
        ),
        240,
        "all six records",
    )
    cells = [c for c, _, _ in rows]
    recs = records(cells, tmp_path / "r")
    assert len(recs) == 6 and all(r["status"] == "completed" for r in recs.values())
    # Same numbers as a run in process.
    run_cell(cells[0], tmp_path / "local")
    assert records(cells[:1], tmp_path / "local")[cells[0]]["metrics"] == recs[cells[0]]["metrics"]
    assert main(["status", "--sweep", "mini", "--results", str(tmp_path / "r")]) == 0
    assert "6 completed" in capsys.readouterr().out


def test_requeued_training_job_resumes_from_its_checkpoint(tmp_path):
    overrides = (*LEXICON_FAST, "train.iterations=300", "train.eval_every=100", "train.checkpoint_every=1")
    root = tmp_path / "r"
    cell = Cell("lexicon", "chi2-rebel", 0, overrides)
    run_cell(Cell("lexicon", "rebel", 0, LEXICON_FAST), tmp_path / "warm")  # builds the preset once
    args = [
        "run",
        "--task",
        "lexicon",
        "--methods",
        "chi2-rebel",
        "--cluster",
        "slurm",
        "--results",
        str(root),
        *overrides,
        "slurm.time_min=20",
    ]
    assert main(args) == 0
    job_id = next(iter(load_registry(next((root / ".sweeps").iterdir())).values()))["job_id"]
    ckpt = cell.run_dir(root) / "checkpoint.pt"
    wait_for(ckpt.exists, 120, "the first checkpoint", poll=0.2)
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True)
    rec = wait_for(lambda: records([cell], root).get(cell), 400, "the resumed run's record", poll=2)
    assert rec["status"] == "completed"
    assert rec["resumed_at"], "the job restarted from its checkpoint, not from scratch"
    run_cell(cell, tmp_path / "whole")
    whole = records([cell], tmp_path / "whole")[cell]
    assert rec["metrics"] == whole["metrics"] and rec["curves"] == whole["curves"]


def test_cancelled_cell_is_reported_and_a_rerun_submits_only_it(tmp_path, capsys):
    root = tmp_path / "r"
    base = [
        "run",
        "--task",
        "linear",
        "--methods",
        "rebel,dpo,ipo",
        "--cluster",
        "slurm",
        "--results",
        str(root),
        *LINEAR_FAST,
        "slurm.time_min=10",
    ]
    assert main([*base, "slurm.setup=[sleep 20]"]) == 0  # jobs linger long enough to cancel one
    name = next((root / ".sweeps").iterdir()).name
    registry = load_registry(root / ".sweeps" / name)
    victim_key, victim = next((k, v) for k, v in registry.items() if "/dpo/" in k)

    def victim_running() -> bool:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True).stdout
        return f"{victim['job_id']} RUNNING" in out

    wait_for(victim_running, 60, "the dpo cell to start", poll=0.2)
    subprocess.run(["scancel", victim["job_id"]], check=True)
    rows = wait_for(
        lambda: (
            (rows := sweep_status(root, name))
            and sum(s == "completed" for _, s, _ in rows) == 2
            and any(s == "failed" for _, s, _ in rows)
            and rows
        ),
        180,
        "two completed cells and the cancelled one",
    )
    failed = [(c, reason) for c, s, reason in rows if s == "failed"]
    assert len(failed) == 1 and failed[0][0].method == "dpo" and "CANCELLED" in failed[0][1]
    capsys.readouterr()
    assert main(["status", "--sweep", name, "--results", str(root)]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert main(base) == 0
    assert "submitted 1 cells" in capsys.readouterr().out
    new = load_registry(root / ".sweeps" / name)
    assert new[victim_key]["job_id"] != victim["job_id"]
    assert {k: v for k, v in new.items() if k != victim_key} == {
        k: v for k, v in registry.items() if k != victim_key
    }
    wait_for(
        lambda: all(s == "completed" for _, s, _ in sweep_status(root, name)), 180, "the resubmitted cell"
    )
