"""A running cell's live output: ``metrics.jsonl`` in its run folder and the trackers of
``train.report_to``, so that a cell can be watched while it runs (``bench status``).

``metrics.jsonl`` holds one JSON object per line, appended and flushed as the cell goes:

* ``{"event": "start", "iterations": T, "resumed_at": k | null, "time": ...}`` at each start;
* ``{"event": "iteration", "iteration": t, "time": ..., "robust_value": ..., <diagnostics>}`` after
  every optimizer step (``methods.weight_diagnostics``: effective sample size, largest weight, ...);
* ``{"event": "eval", "iteration": t, "time": ..., "worst_case": ..., "val_worst_case": ...}``
  after every evaluation (the scalar metrics of the row).

A reader skips a torn last line (``read_metrics``). A cell that resumes from a checkpoint at
iteration k first rewrites the file without the lines after k (atomically), and a fresh start
empties it, so each iteration is there exactly once. With several ranks only rank 0 writes and logs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
RECENT = 20  # iterations the s/iteration of ``progress`` averages over


def read_metrics(path: Path) -> list[dict]:
    """The events of a ``metrics.jsonl``, skipping lines that do not parse (a torn last line)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def scalars(row: dict) -> dict[str, float]:
    """The finite numeric top-level entries of a metrics row (lists, dicts and None left out)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def tracker_scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """``scalars`` under ``prefix/``, with a list of numbers (GR-DPO's group weights) as one key each."""
    out = {f"{prefix}/{k}": v for k, v in scalars(values).items()}
    for key, value in values.items():
        if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            out.update({f"{prefix}/{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


class Monitor:
    """Writes a cell's ``metrics.jsonl`` and feeds its trackers (``bench.loops.trackers``).

    ``trackers`` are the names of ``train.report_to`` and ``tracker_run`` what they need to open a
    run (``TrackerRun``); with none, only the metrics file is written. Use as a context manager:
    leaving it closes the file and the trackers, whatever happened in the cell.
    """

    def __init__(self, run_dir: Path, trackers: Sequence[str] = (), tracker_run=None, rank: int = 0):
        self.path = Path(run_dir) / METRICS
        self.names, self.tracker_run, self.rank = list(trackers), tracker_run, rank
        self.trackers: list = []
        self.file = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, iterations: int, resumed_at: int | None = None) -> None:
        """Begin (or resume at iteration ``resumed_at``) a run of ``iterations`` iterations."""
        if self.rank:
            return
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_at is not None:
            kept = [e for e in read_metrics(self.path) if e.get("iteration", 0) <= resumed_at]
        self._rewrite(kept)
        self.file = open(self.path, "a")  # noqa: SIM115 (held for the run, closed by close())
        self._write({"event": "start", "iterations": iterations, "resumed_at": resumed_at})
        if self.names:
            from bench.loops.trackers import open_trackers

            self.trackers = open_trackers(self.names, replace(self.tracker_run, resume_step=resumed_at))

    def iteration(self, iteration: int, values: dict[str, Any]) -> None:
        """One optimizer step's values (robust objective, diagnostics, timings)."""
        self._event("iteration", iteration, values, "train")

    def evaluation(self, iteration: int, row: dict[str, Any]) -> None:
        """One evaluation's scalar metrics."""
        self._event("eval", iteration, scalars(row), "eval")

    def table(self, name: str, rows: list[dict]) -> None:
        """Rows (e.g. the before/after samples) for the trackers that keep tables."""
        for tracker in self.trackers:
            tracker.table(name, rows)

    def finish(self, metrics: dict[str, Any]) -> None:
        """The final record's headline metrics as each tracker run's summary; then close."""
        for tracker in self.trackers:
            tracker.summary(scalars(metrics))
        self.close()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.file is not None:
            self.file.close()
            self.file = None

    def _event(self, event: str, iteration: int, values: dict[str, Any], prefix: str) -> None:
        if self.rank or self.file is None:
            return
        self._write({"event": event, "iteration": iteration, **values})
        logged = tracker_scalars(values, prefix)
        for tracker in self.trackers:
            tracker.log(logged, iteration)

    def _write(self, event: dict) -> None:
        self.file.write(json.dumps({**event, "time": time.time()}) + "\n")
        self.file.flush()

    def _rewrite(self, events: list[dict]) -> None:
        """Replace the file by ``events``, atomically (a kill leaves the old file or the new one)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{METRICS}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.writelines(json.dumps(e) + "\n" for e in events)
        os.replace(tmp, self.path)


def progress(run_dir: Path, now: float | None = None) -> dict | None:
    """A cell's progress from its ``metrics.jsonl``: ``iteration``, ``iterations``, the latest
    ``val_worst_case`` and its ``eval_iteration`` (None before the first evaluation),
    ``s_per_iteration`` (wall seconds, evaluations included, over the last ``RECENT`` iterations
    of the current start), ``eta_s`` and ``age_s`` (seconds since the last line); None without a
    metrics file."""
    events = read_metrics(Path(run_dir) / METRICS)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    if not starts:
        return None
    start = events[starts[-1]]
    total = int(start.get("iterations", 0))
    steps = [e for e in events[starts[-1] :] if e["event"] == "iteration"]
    done = [e for e in events if e["event"] == "iteration"]
    evals = [e for e in events if e["event"] == "eval" and "val_worst_case" in e]
    iteration = done[-1]["iteration"] if done else int(start.get("resumed_at") or 0)
    marks = [start["time"]] + [e["time"] for e in steps]
    marks = marks[-(RECENT + 1) :]
    rate = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
    now = time.time() if now is None else now
    return {
        "iteration": iteration,
        "iterations": total,
        "val_worst_case": evals[-1]["val_worst_case"] if evals else None,
        "eval_iteration": evals[-1]["iteration"] if evals else None,
        "s_per_iteration": rate,
        "eta_s": None if rate is None else rate * max(0, total - iteration),
        "age_s": now - events[-1]["time"],
    }
