"""Nothing lost, nothing run twice (issue 17, items 2, 5 and 6): concurrent launchers of one sweep,
readers that survive bad records and read-only folders, group-readable records, and SIGINT/SIGTERM
to `bench run` stopping its local workers at a checkpoint."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import LEXICON_FAST

from bench.cli import main
from bench.harness.launch import launch
from bench.harness.records import write_json_atomic
from bench.harness.runner import Cell, live_owner, record_path, run_cell
from bench.loops.monitor import progress

BENCH = str(Path(sys.executable).with_name("bench"))
LINEAR = ["train.iterations=60", "train.eval_every=20", "task.n_test=128", "task.n_val=96"]


def bench(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def cells_run(out: str) -> int:
    return int(re.search(r"^(\d+) cells run", out, re.M).group(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,methods,seeds,extra",
    [
        ("linear", "dpo,kldpo,chi2-dpo", "0,1", LINEAR),
        ("lexicon", "chi2-rebel", "0", [*LEXICON_FAST, "train.iterations=8", "train.checkpoint_every=1"]),
    ],
)
def test_two_identical_launchers_train_every_cell_once(tmp_path, task, methods, seeds, extra):
    args = ["run", "--task", task, "--methods", methods, "--seeds", seeds, "--cluster", "local"]
    procs = [bench(*args, "--results", str(tmp_path), "--quiet", *extra) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    n_cells = len(methods.split(",")) * len(seeds.split(","))
    assert sum(cells_run(o) for o, _ in outs) == n_cells, "each cell trained by exactly one launcher"
    records = list((tmp_path / task).rglob("record.json"))
    assert len(records) == n_cells and all(
        json.loads(p.read_text())["status"] == "completed" for p in records
    )
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("checkpoint.pt"))
    (sweep,) = (tmp_path / ".sweeps").iterdir()
    assert len(json.loads((sweep / "jobs.json").read_text())) == n_cells


@pytest.mark.slow
def test_a_cell_owned_by_a_live_process_is_left_to_it_and_taken_over_when_it_dies(tmp_path):
    cell = Cell("linear", "dpo", 0, tuple(LINEAR))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_OWNER, str(cell.run_dir(tmp_path))], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "owned"
    assert live_owner(cell.run_dir(tmp_path))["pid"] == holder.pid
    assert run_cell(cell, tmp_path) == "in-flight" and not record_path(cell, tmp_path).exists()
    holder.kill()
    holder.wait()
    assert live_owner(cell.run_dir(tmp_path)) is None, "the kernel released the dead owner's lock"
    assert run_cell(cell, tmp_path) == "completed"


HOLD_OWNER = """
import sys, time
from pathlib import Path
from bench.harness.runner import cell_owner
with cell_owner(Path(sys.argv[1])) as owned:
    print("owned" if owned else "taken", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_duplicate_methods_are_one_cell(tmp_path):
    cell = Cell("linear", "dpo", 0, tuple(LINEAR))
    report = launch([cell, cell], tmp_path, name="dup", cluster="debug", progress=False)
    assert report.submitted == [cell]


def test_records_are_readable_by_the_group(tmp_path):
    old = os.umask(0o002)
    try:
        write_json_atomic(tmp_path / "record.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "record.json").stat().st_mode) == 0o664


def good_record(root: Path, seed: int) -> None:
    write_json_atomic(
        root / "linear" / "dpo" / "abc" / f"seed-{seed}" / "record.json",
        {
            "task": "linear",
            "method": "dpo",
            "seed": seed,
            "status": "completed",
            "config": {"method": {"name": "dpo", "beta": 1.0}},
            "config_hash": "abc",
            "radius": None,
            "tags": [],
            "metrics": {"worst_case": -0.2 - seed / 100, "mean_over_test": 0.0, "train_reward": 0.0}
            | {"kl_ref": 0.1},
            "curves": [
                {"iteration": 0, "worst_case": -0.3, "kl_ref": 0.0},
                {"iteration": 10, "worst_case": -0.2 - seed / 100, "kl_ref": 0.1},
            ],
        },
    )


@pytest.mark.parametrize(
    "content", [b"\x89\xff\xfe binary garbage \x00", b'{"task": "linear", "status": "compl', b"[1, 2]"]
)
def test_readers_skip_a_bad_record_naming_it(tmp_path, capsys, content):
    for seed in (0, 1):
        good_record(tmp_path, seed)
    bad = tmp_path / "linear" / "dpo" / "zzz" / "seed-0" / "record.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    for args in (["leaderboard"], ["report", "--out", str(tmp_path / "out")]):
        with pytest.warns(RuntimeWarning, match=rf"skipping unreadable record {re.escape(str(bad))}"):
            assert main([*args, "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| dpo " in out and "nan" not in out


@pytest.fixture
def shared_tmp():
    """A temporary folder others may enter (pytest's own is private to its user)."""
    path = Path(tempfile.mkdtemp(prefix="bench-ro-"))
    path.chmod(0o755)
    yield path
    for sub in [path, *path.rglob("*")]:
        sub.chmod(sub.stat().st_mode | 0o700)
    shutil.rmtree(path)


@pytest.mark.slow
def test_read_only_results_serve_read_only_commands(shared_tmp):
    tmp_path = shared_tmp
    results = tmp_path / "results"
    args = ["--task", "linear", "--methods", "dpo", "--cluster", "debug", "--results", str(results), *LINEAR]
    assert main(["run", *args, "--quiet"]) == 0
    for path in [results, *results.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    as_user = []
    if os.geteuid() == 0:  # root writes anywhere: run the commands as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    env = dict(os.environ, HOME=str(tmp_path), BENCH_CACHE_DIR=str(tmp_path / "cache"))
    for command in (
        ["run", *args],
        ["leaderboard", "--results", str(results)],
        ["status", "--results", str(results)],
    ):
        done = subprocess.run(
            [*as_user, BENCH, *command], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, (command, done.stderr[-1500:])
        assert "| dpo " in done.stdout or command[0] == "status"
    out = tmp_path / "report"
    out.mkdir()
    out.chmod(0o777)  # writable by the user the commands run as
    done = subprocess.run(
        [*as_user, BENCH, "report", "--results", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and (out / "linear" / "leaderboard.md").exists(), done.stderr[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_bench_run_stops_its_workers_at_a_checkpoint_and_a_rerun_resumes(tmp_path, sig):
    overrides = (*LEXICON_FAST, "train.iterations=200", "train.eval_every=200", "train.checkpoint_every=1000")
    cell = Cell("lexicon", "rebel", 0, overrides)
    args = [
        "run",
        "--task",
        "lexicon",
        "--methods",
        "rebel",
        "--cluster",
        "local",
        "--results",
        str(tmp_path),
    ]
    # as from a terminal: SIGINT handled, even when this test runs in a background job (which a
    # non-interactive shell starts with SIGINT ignored, a disposition children inherit)
    proc = bench(
        *args, "--quiet", *overrides, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    deadline = time.time() + 300
    while live_owner(cell.run_dir(tmp_path)) is None and time.time() < deadline:
        time.sleep(0.2)
    worker = live_owner(cell.run_dir(tmp_path))
    assert worker, "the cell never started"
    # into training: its live metrics say so (a fixed sleep raced a cell that finished first when idle)
    while ((progress(cell.run_dir(tmp_path)) or {}).get("iteration", 0) < 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "run the same command again" in err, err[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(worker["pid"], 0)  # the worker is gone, not orphaned
    assert (cell.run_dir(tmp_path) / "checkpoint.pt").exists() and not record_path(cell, tmp_path).exists()
    proc = bench(*args, "--quiet", *overrides)
    proc.communicate(timeout=600)
    rec = json.loads(record_path(cell, tmp_path).read_text())
    assert rec["status"] == "completed" and len(rec["resumed_at"]) == 1 and 0 < rec["resumed_at"][0] < 200
