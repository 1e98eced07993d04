"""bench run end to end on the linear task: records, skipping, failures, reproducibility, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.harness.launch import launch
from bench.harness.leaderboard import leaderboard, load_records, records_frame
from bench.harness.runner import Cell, record_path, run_cell

FAST = ("train.iterations=20", "train.eval_every=10", "task.n=64", "task.n_test=64", "task.n_val=32")


def record(cell, root):
    return json.loads(record_path(cell, root).read_text())


def test_same_seed_same_numbers_across_executors(tmp_path):
    cells = [Cell("linear", m, 0, FAST) for m in ("rebel", "chi2-rebel", "wdpo")]
    launch(cells, tmp_path / "debug", name="t", cluster="debug", progress=False)
    launch(cells, tmp_path / "local", name="t", cluster="local", progress=False)
    for cell in cells:
        a, b = record(cell, tmp_path / "debug"), record(cell, tmp_path / "local")
        assert a["status"] == b["status"] == "completed"
        assert a["theta"] == b["theta"] and a["metrics"] == b["metrics"]
        assert a["seeds"]["torch"] == 0 and "commit" in a["git"]
        assert a["timings"]["peak_memory_mb"]["rss"] > 0 and a["timings"]["pairs_per_s"] > 0
    other = Cell("linear", "rebel", 1, FAST)
    run_cell(other, tmp_path / "debug")
    assert record(other, tmp_path / "debug")["theta"] != record(cells[0], tmp_path / "debug")["theta"]


def test_micro_batching_does_not_change_the_run(tmp_path):
    whole = Cell("linear", "w-rebel", 0, FAST)
    split = Cell("linear", "w-rebel", 0, (*FAST, "train.micro_batch=16"))
    run_cell(whole, tmp_path)
    run_cell(split, tmp_path)
    a, b = record(whole, tmp_path)["theta"], record(split, tmp_path)["theta"]
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_rerun_skips_completed_and_failed_cell_is_recorded(tmp_path):
    good = Cell("linear", "rebel", 0, FAST)
    bad = Cell("linear", "chi2-rebel", 0, (*FAST, "task.noise=1e308"))  # rewards overflow to inf
    report = launch([good, bad], tmp_path, name="t", cluster="debug", progress=False)
    assert len(report.submitted) == 2
    failed = record(bad, tmp_path)
    assert failed["status"] == "failed" and "NaN" in failed["error"]["message"]
    assert "Traceback" in failed["error"]["traceback"]
    mtime = record_path(good, tmp_path).stat().st_mtime_ns
    again = launch([good, bad], tmp_path, name="t", cluster="debug", progress=False)
    assert again.skipped == [good] and again.submitted == [bad]
    assert record_path(good, tmp_path).stat().st_mtime_ns == mtime
    board = leaderboard(records_frame(load_records(tmp_path)))
    assert list(board.method) == ["rebel"], "a failed cell never enters the ranking"


def test_leaderboard_aggregates_seeds_and_keeps_configs_apart(tmp_path):
    cells = [Cell("linear", "rebel", s, FAST) for s in (0, 1)]
    cells.append(Cell("linear", "rebel", 0, (*FAST, "method.eta=0.5")))
    launch(cells, tmp_path, name="t", cluster="debug", progress=False)
    board = leaderboard(records_frame(load_records(tmp_path)))
    assert sorted(board.seeds) == [1, 2] and board.config_hash.nunique() == 2
    two = board[board.seeds == 2].iloc[0]
    values = [record(c, tmp_path)["metrics"]["worst_case"] for c in cells[:2]]
    assert two.worst_case == pytest.approx(sum(values) / 2)
    assert list(board.worst_case) == sorted(board.worst_case, reverse=True)


def test_cli_run_prints_a_leaderboard_and_errors_are_clear(tmp_path, capsys):
    args = [
        "run",
        "--methods",
        "rebel,kl-rebel",
        "--seeds",
        "0,1",
        "--cluster",
        "debug",
        "--results",
        str(tmp_path),
        "--quiet",
        *FAST,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 cells run" in out and "kl-rebel" in out and "worst case, val-selected" in out
    assert main(args) == 0 and "0 cells run, 4 skipped" in capsys.readouterr().out
    assert main(["run", "--methods", "chi3-rebel", "--results", str(tmp_path)]) == 2
    assert "Did you mean chi2-rebel" in capsys.readouterr().err
    assert main(["run", "--methods", "chi2-rebel", "method.rho=-0.5", "--results", str(tmp_path)]) == 2
    assert "method.rho" in capsys.readouterr().err
    assert main(["run", "--methods", "rebel", "task.bogus=1", "--results", str(tmp_path)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_console_script_lists_methods():
    exe = Path(sys.executable).with_name("bench")
    out = subprocess.run([str(exe), "list", "methods"], capture_output=True, text=True, check=True).stdout
    for name in (
        "rebel",
        "w-rebel",
        "kl-rebel",
        "chi2-rebel",
        "dpo",
        "wdpo",
        "kldpo",
        "chi2-dpo",
        "tv-dpo",
        "dr-dpo",
        "gr-dpo",
    ):
        assert f"\n{name} " in out
    assert subprocess.run([str(exe), "--help"], capture_output=True, text=True).returncode == 0
