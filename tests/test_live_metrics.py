"""Live metrics per cell (bench.loops.monitor): metrics.jsonl, its readers and `bench status`."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LEXICON_FAST

from bench.cli import main
from bench.harness.runner import Cell, live_owner, record_path, run_cell
from bench.loops.config import build_config, config_hash
from bench.loops.monitor import METRICS, Monitor, progress, read_metrics

BENCH = str(Path(sys.executable).with_name("bench"))


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_metrics(run_dir / METRICS) if e["event"] == kind]


def test_a_reader_skips_a_torn_last_line_and_garbage(tmp_path):
    path = tmp_path / METRICS
    good = [
        {"event": "start", "iterations": 3, "time": 1.0},
        {"event": "iteration", "iteration": 1, "time": 2.0},
    ]
    path.write_text("".join(json.dumps(e) + "\n" for e in good) + "[1, 2]\nnot json\n" + '{"event": "itera')
    assert read_metrics(path) == good
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_a_resumed_monitor_drops_the_lines_after_its_checkpoint(tmp_path):
    with Monitor(tmp_path) as monitor:
        monitor.start(6)
        for it in range(1, 6):
            monitor.iteration(it, {"robust_value": float(it)})
            if it % 2 == 0:
                monitor.evaluation(it, {"val_worst_case": it / 10, "per_pair": [1, 0], "kl_ref": None})
    with open(tmp_path / METRICS, "a") as torn:  # killed mid-write after iteration 5
        torn.write('{"event": "iteration", "iter')
    with Monitor(tmp_path) as monitor:
        monitor.start(6, resumed_at=3)  # the checkpoint was at iteration 3
        for it in range(4, 7):
            monitor.iteration(it, {"robust_value": float(it)})
    assert [e["iteration"] for e in events(tmp_path, "iteration")] == [1, 2, 3, 4, 5, 6]
    assert [(e["iteration"], e["val_worst_case"]) for e in events(tmp_path, "eval")] == [(2, 0.2)]
    assert "per_pair" not in events(tmp_path, "eval")[0]  # only scalars go to the live file
    assert [e["resumed_at"] for e in events(tmp_path, "start")] == [None, 3]
    with Monitor(tmp_path) as monitor:
        monitor.start(6)  # a fresh start (no checkpoint) begins an empty file
    assert [e["event"] for e in read_metrics(tmp_path / METRICS)] == ["start"]


def test_progress_counts_the_current_start_and_estimates_the_time_left(tmp_path):
    lines = [
        {"event": "start", "iterations": 10, "resumed_at": None, "time": 100.0},
        {"event": "iteration", "iteration": 1, "time": 101.0},
        {"event": "eval", "iteration": 1, "val_worst_case": 0.25, "time": 101.5},
        {"event": "start", "iterations": 10, "resumed_at": 1, "time": 200.0},  # resumed much later
        {"event": "iteration", "iteration": 2, "time": 202.0},
        {"event": "iteration", "iteration": 3, "time": 204.0},
        {"event": "iteration", "iteration": 4, "time": 206.0},
    ]
    (tmp_path / METRICS).write_text("".join(json.dumps(e) + "\n" for e in lines))
    live = progress(tmp_path, now=210.0)
    assert live == {
        "iteration": 4,
        "iterations": 10,
        "val_worst_case": 0.25,
        "eval_iteration": 1,
        "s_per_iteration": 2.0,  # (206 - 200) / 3: the downtime before the resume does not count
        "eta_s": 12.0,
        "age_s": 4.0,
    }
    assert progress(tmp_path / "nothing") is None


def test_a_cell_writes_every_iteration_and_evaluation_with_its_diagnostics(tmp_path):
    cell = Cell("linear", "chi2-rebel", 0, ("train.iterations=30", "train.eval_every=10"))
    assert run_cell(cell, tmp_path) == "completed"
    run_dir, rec = cell.run_dir(tmp_path), json.loads(record_path(cell, tmp_path).read_text())
    steps = events(run_dir, "iteration")
    assert [e["iteration"] for e in steps] == list(range(1, 31))
    assert [e["iteration"] for e in events(run_dir, "eval")] == [0, 10, 20, 30]
    assert [e["val_worst_case"] for e in events(run_dir, "eval")] == [
        c["val_worst_case"] for c in rec["curves"]
    ]
    live = [{k: v for k, v in e.items() if k not in ("event", "time")} for e in steps]
    assert live == rec["steps"]  # the record keeps the same per-step curve
    assert all(
        0 < s["ess"] <= 64 and "dual_eta" in s and 0 <= s["zero_weight_share"] < 1 for s in rec["steps"]
    )
    assert {"ess", "max_weight", "dual_eta"} <= rec["curves"][1].keys()


def test_the_tracker_list_stays_out_of_the_config_hash():
    plain = build_config("linear", "rebel", ())
    assert config_hash(build_config("linear", "rebel", ("train.report_to=[tensorboard]",))) == config_hash(
        plain
    )
    assert config_hash(build_config("linear", "rebel", ("train.lr=0.5",))) != config_hash(plain)


def test_a_bad_watch_period_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["status", "--results", str(tmp_path), "--watch", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--watch" in err and "seconds > 0" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_bench_status_shows_a_running_cells_iteration_and_worst_case(tmp_path):
    overrides = (*LEXICON_FAST, "train.iterations=400", "train.eval_every=1", "train.checkpoint_every=1000")
    cell = Cell("lexicon", "rebel", 0, overrides)
    args = ["--task", "lexicon", "--methods", "rebel", "--cluster", "local", "--results", str(tmp_path)]
    run = subprocess.Popen([BENCH, "run", *args, "--quiet", *overrides], stderr=subprocess.PIPE, text=True)
    try:
        deadline, screen = time.time() + 300, ""
        while time.time() < deadline:
            live = progress(cell.run_dir(tmp_path))
            if live and live["iteration"] >= 3 and live["val_worst_case"] is not None:
                screen = subprocess.run(
                    [BENCH, "status", "--results", str(tmp_path)], capture_output=True, text=True, timeout=60
                ).stdout
                break
            time.sleep(0.5)
        assert live_owner(cell.run_dir(tmp_path)), "the cell is still running"
    finally:
        run.terminate()  # bench run stops its worker at the end of an iteration, exits 130
        run.communicate(timeout=300)
    assert "1 running" in screen, screen
    row = next(line for line in screen.splitlines() if line.startswith("lexicon/rebel"))
    found = re.search(r"running\s+(\d+)/(\d+)\s+(-?\d\.\d{4}) @(\d+)\s+(\d+\.\d+)\s+(\S+)", row)
    it, total, worst, at, rate, eta = found.groups()
    assert 3 <= int(it) < 400 and int(total) == 400 and float(rate) > 0 and eta != "-", row
    assert int(at) in (int(it) - 1, int(it))  # the latest evaluation (the step's own may be on its way)
    written = [e for e in events(cell.run_dir(tmp_path), "eval") if e["iteration"] == int(at)]
    assert f"{written[0]['val_worst_case']:.4f}" == worst


def tensorboard_scalars(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def test_a_cell_reports_to_its_trackers_one_run_named_grouped_and_tagged(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = ("train.iterations=12", "train.eval_every=4", "train.report_to=[tensorboard,mlflow]")
    cell = Cell("linear", "chi2-rebel", 0, overrides)
    assert run_cell(cell, tmp_path, sweep="grid-a") == "completed"
    run_dir, rec = cell.run_dir(tmp_path), json.loads(record_path(cell, tmp_path).read_text())
    ess = [(s["iteration"], s["ess"]) for s in rec["steps"]]
    assert [(k, pytest.approx(v)) for k, v in tensorboard_scalars(run_dir, "train/ess")] == ess
    worst = [(c["iteration"], c["worst_case"]) for c in rec["curves"]]
    assert [(k, pytest.approx(v)) for k, v in tensorboard_scalars(run_dir, "eval/worst_case")] == worst
    assert tensorboard_scalars(run_dir, "summary/worst_case")[0][1] == pytest.approx(
        rec["metrics"]["worst_case"]
    )

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("bench-linear").experiment_id])
    assert run.info.run_name == cell.label() and run.data.tags["group"] == "grid-a"
    assert {"method", "task", "radius"} <= run.data.tags.keys() and run.data.tags["method"] == "chi2-rebel"
    assert run.data.params["method.rho"] == str(rec["config"]["method"]["rho"])
    history = client.get_metric_history(run.info.run_id, "train/dual_eta")
    assert [(m.step, pytest.approx(m.value)) for m in history] == [
        (s["iteration"], s["dual_eta"]) for s in rec["steps"]
    ]
    assert run.data.metrics["summary/worst_case"] == pytest.approx(rec["metrics"]["worst_case"])
    # switching a tracker on never re-runs a completed cell: the same run folder, already complete
    assert cell.run_dir(tmp_path) == Cell("linear", "chi2-rebel", 0, overrides[:2]).run_dir(tmp_path)


def test_watch_leaves_once_nothing_runs(tmp_path, capsys):
    results = str(tmp_path)
    assert (
        main(
            [
                "run",
                "--task",
                "linear",
                "--methods",
                "rebel",
                "--cluster",
                "debug",
                "--results",
                results,
                "--quiet",
                "train.iterations=5",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", "--results", results, "--watch", "0.1"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("\x1b[H\x1b[2J")
        and "bench status --watch 0.1" in out
        and "1 completed, 0 running" in out
    )
