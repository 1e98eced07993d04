"""Schedule cells through submitit: in process (debug), as local subprocesses, or on SLURM.

Cells whose record says completed are skipped, so re-running a command runs only what is missing
or failed. Cells are dealt round-robin into at most ``workers`` jobs; each job imports torch once
and runs its cells in order, recording each one (a failing cell never stops the others).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
from tqdm import tqdm

from bench.runner import Cell, is_completed, record_path, run_cells

CLUSTERS = ("debug", "local")


@dataclass
class LaunchReport:
    submitted: list[Cell]
    skipped: list[Cell]
    job_errors: list[str]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def launch(
    cells: list[Cell],
    root: Path,
    cluster: str = "local",
    workers: int = 0,
    timeout_min: int = 120,
    progress: bool = True,
) -> LaunchReport:
    """Run every pending cell and wait for them; returns what ran and what was skipped."""
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; known: {', '.join(CLUSTERS)}")
    root = Path(root)
    pending = [c for c in cells if not is_completed(c, root)]
    skipped = [c for c in cells if c not in pending]
    if not pending:
        return LaunchReport([], skipped, [])
    cores = usable_cores()
    n_jobs = 1 if cluster == "debug" else min(len(pending), workers or cores)
    chunks = [pending[i::n_jobs] for i in range(n_jobs)]
    threads = max(1, cores // n_jobs)
    started = time.time()
    executor = submitit.AutoExecutor(folder=root / ".submitit" / "%j", cluster=cluster)
    executor.update_parameters(timeout_min=timeout_min)
    jobs = executor.map_array(run_cells, chunks, [str(root)] * n_jobs, [threads] * n_jobs)
    errors: list[str] = []
    if cluster == "debug":  # the debug executor runs a job when its result is asked for
        for job in jobs:
            errors += _result(job)
    else:
        _wait(jobs, pending, root, progress, started)
        for job in jobs:
            errors += _result(job)
    return LaunchReport(pending, skipped, errors)


def _result(job: submitit.Job) -> list[str]:
    try:
        job.result()
        return []
    except Exception as err:  # the job itself died (killed, timed out): its cells lack records
        return [f"job {job.job_id}: {type(err).__name__}: {str(err).strip().splitlines()[-1]}"]


def _wait(jobs: list[submitit.Job], cells: list[Cell], root: Path, progress: bool, started: float) -> None:
    """Block until every job ends, with a progress bar (and ETA) over records written since start."""
    paths = [record_path(c, root) for c in cells]
    with tqdm(total=len(cells), desc="cells", unit="cell", disable=not progress, smoothing=0.1) as bar:
        while True:
            finished = sum(p.exists() and p.stat().st_mtime >= started for p in paths)
            bar.update(finished - bar.n)
            if all(job.done() for job in jobs):
                break
            time.sleep(0.25)
