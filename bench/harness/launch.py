"""Schedule cells through submitit: in process (debug), local subprocesses, or SLURM job arrays.

One code path for every cluster: the submitted callable is ``CellJob`` (checkpointable), whose
arguments are cells and the results root. Cells whose record says completed are skipped, and on
SLURM so are cells whose job is still pending or running, so re-running a command submits only
what is missing or failed. Locally, cells are dealt round-robin into at most one job per core (for
a task that asks for a GPU: one job per visible GPU, each seeing only its own) and the command
waits with a progress bar; on SLURM each cell is one array task (arrays chunked under
the cluster's size limit, ``max_running`` at a time) and the command returns at once, having
written the job ids into the sweep's folder (``results/.sweeps/<name>/jobs.json``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable
from tqdm import tqdm

import tasks
from bench.core.artifacts import locked
from bench.harness.plan import (
    local_gpu,
    refuse_what_cannot_fit,
    sized_resources,
    slurm_gpu,
    with_resolved_shard,
)
from bench.harness.records import read_json, write_json_atomic
from bench.harness.runner import (
    ALREADY_COMPLETED,
    IN_FLIGHT_ELSEWHERE,
    Cell,
    live_owner,
    record_path,
    run_cells,
)
from bench.harness.sweep import SlurmConfig

CLUSTERS = ("debug", "local", "slurm")
IN_FLIGHT = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "REQUEUE_HOLD",
}


class CellJob(Checkpointable):
    """Runs its cells. On preemption (USR2) or time-out submitit requeues it with the same
    arguments; each cell then resumes from the checkpoint in its run folder (a plain
    ``scontrol requeue``, which restarts the job from scratch, resumes the same way)."""

    def __init__(self, sweep: str = ""):
        self.sweep = sweep  # the tracker runs' group

    def __call__(self, cells: list[Cell], root: str) -> list[str]:
        return run_cells([with_resolved_shard(c, root) for c in cells], root, self.sweep)


@dataclass
class LaunchReport:
    submitted: list[Cell]
    skipped: list[Cell]
    in_flight: list[Cell] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    job_errors: list[str] = field(default_factory=list)
    taken_elsewhere: int = 0  # submitted cells another launcher was running or finished first


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cell_key(cell: Cell, root: Path) -> str:
    return str(cell.run_dir(root).relative_to(root))


def _read_or_none(path: Path):
    """The JSON at ``path``, or None when it is missing or unreadable (then rewritten whole)."""
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


def load_registry(folder: Path) -> dict:
    """The sweep's ``jobs.json``: cell key -> job id, cluster, submission time."""
    found = _read_or_none(folder / "jobs.json")
    return found if isinstance(found, dict) else {}


def _record(cell: Cell, root: Path) -> dict | None:
    found = _read_or_none(record_path(cell, root))
    return found if isinstance(found, dict) else None


def cell_status(
    cell: Cell, root: Path, registry: dict, states: dict[str, tuple[str, str]]
) -> tuple[str, str]:
    """``(status, reason)``: completed, running, pending, failed or missing. A cell whose owner lock
    a live process holds is running, whichever launcher (or machine) started it."""
    rec = _record(cell, root)
    if rec and rec.get("status") == "completed":
        return "completed", ""
    owner = live_owner(cell.run_dir(root))
    if owner is not None:
        return "running", f"owned by {owner.get('host', '?')}:{owner.get('pid', '?')}"
    job = registry.get(cell_key(cell, root))
    state, reason = states.get(job["job_id"], ("", "")) if job else ("", "")
    if state in IN_FLIGHT:
        return (
            "running" if state == "RUNNING" else "pending"
        ), f"job {job['job_id']} {state} {reason}".strip()
    if rec and rec.get("status") == "failed":
        return "failed", f"{rec['error']['type']}: {rec['error']['message']}"
    if state:
        return "failed", f"job {job['job_id']} {state} {reason}".strip()
    if job and job["cluster"] == "slurm":
        return (
            "failed",
            f"job {job['job_id']} vanished from SLURM without a record (cancelled before it started?)",
        )
    if job and job["cluster"] == "local" and local_job_alive(job):
        return "pending", f"queued in local job {job['job_id']}"
    if job:
        return "failed", f"job {job['job_id']} ({job['cluster']}) ended without a record"
    return "missing", "not submitted"


def local_job_alive(job: dict) -> bool:
    """Whether the local job (its id is its pid) still runs: on this host, a live process."""
    if job.get("host", socket.gethostname()) != socket.gethostname():
        return False
    try:
        os.kill(int(job["job_id"]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _expand_array_id(job_id: str) -> list[str]:
    """``12_[0-2,5%2]`` -> ``12_0 12_1 12_2 12_5``; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    ids = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``job id -> (state, reason)`` from squeue (queued jobs) and sacct (finished ones)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, tuple[str, str]] = {}
    queries = [
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason", "-j", ",".join(bases)],
        ["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)],  # authoritative while queued
    ]
    for cmd in queries:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 2:
                state = parts[1].split()[0]  # "CANCELLED by 0" -> CANCELLED
                reason = parts[2] if len(parts) > 2 and parts[2] not in ("None", "(null)") else ""
                for jid in _expand_array_id(parts[0]):
                    states[jid] = (state, reason)
    return states


def visible_gpu_ids() -> list[int]:
    """The GPUs local jobs may use: ``CUDA_VISIBLE_DEVICES`` as given, else every CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        return (
            [int(x) for x in env.split(",") if x.strip()] if env else list(range(torch.cuda.device_count()))
        )
    except ValueError:  # GPU UUIDs: the jobs inherit the variable and share the devices
        return []


def needs_gpu(cells: list[Cell]) -> bool:
    return any(tasks.get(c.task).gpus > 0 for c in cells)


def make_executor(
    cluster: str, folder: Path, timeout_min: int, slurm: SlurmConfig | None, cells: list[Cell] = ()
) -> submitit.Executor:
    """An executor for ``cells``: on SLURM with the resources the cells' tasks need (``slurm`` wins)."""
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; known: {', '.join(CLUSTERS)}")
    if cluster == "local":  # the plain local executor: it takes which GPUs a job sees
        executor = submitit.LocalExecutor(folder=folder / "submitit" / "%j")
        executor.update_parameters(timeout_min=timeout_min)
        return executor
    if cluster == "debug":
        executor = submitit.AutoExecutor(folder=folder / "submitit" / "%j", cluster=cluster)
        executor.update_parameters(timeout_min=timeout_min)
        return executor
    s = sized_resources(list(cells), slurm or SlurmConfig())
    executor = submitit.AutoExecutor(
        folder=folder / "submitit" / "%j", cluster="slurm", slurm_max_num_timeout=s.max_timeouts
    )
    env = ["export HF_HUB_OFFLINE=1", "export HF_DATASETS_OFFLINE=1"] if s.offline else []
    cache = s.cache_dir or os.environ.get("BENCH_CACHE_DIR")
    env += [
        f"export {k}={shlex.quote(v)}" for k, v in (("HF_HOME", s.hf_home), ("BENCH_CACHE_DIR", cache)) if v
    ]
    params = {
        "name": "bench",
        "timeout_min": s.time_min,
        "mem_gb": s.mem_gb,
        "cpus_per_task": s.cpus_per_task,
        "tasks_per_node": s.tasks_per_node,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_array_parallelism": s.max_running,
        "slurm_setup": [*env, *s.setup],
        "slurm_additional_parameters": dict(s.extra),
        "slurm_signal_delay_s": s.signal_delay_s,
        "slurm_gpus_per_task": s.gpus_per_task or None,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def launch(
    cells: list[Cell],
    root: Path,
    *,
    name: str,
    cluster: str = "local",
    workers: int = 0,
    timeout_min: int = 120,
    slurm: SlurmConfig | None = None,
    progress: bool = True,
) -> LaunchReport:
    """Submit every cell that is neither completed nor in flight (duplicates merged); wait unless on
    SLURM. Concurrent launchers of one sweep share its registry: each adds its jobs under a lock."""
    cells = list(dict.fromkeys(cells))
    root = Path(root).resolve()
    folder = root / ".sweeps" / name
    registry = load_registry(folder)
    known = [registry[k] for k in (cell_key(c, root) for c in cells) if k in registry]
    states = slurm_states([j["job_id"] for j in known if j["cluster"] == "slurm"])
    status = {c: cell_status(c, root, registry, states)[0] for c in cells}
    skipped = [c for c in cells if status[c] == "completed"]
    in_flight = [c for c in cells if status[c] in ("pending", "running")]
    pending = [c for c in cells if status[c] in ("failed", "missing")]
    listed = [
        {
            "key": cell_key(c, root),
            "task": c.task,
            "method": c.method,
            "seed": c.seed,
            "overrides": list(c.overrides),
        }
        for c in cells
    ]
    cells_file = folder / "cells.json"
    if _read_or_none(cells_file) != listed:  # a re-run of the same sweep writes nothing
        write_json_atomic(cells_file, listed)
    report = LaunchReport(pending, skipped, in_flight)
    if not pending:
        return report
    slots = visible_gpu_ids() if cluster == "local" and needs_gpu(pending) else []
    if cluster == "slurm":
        refuse_what_cannot_fit(pending, slurm_gpu(slurm or SlurmConfig()))
    elif slots:
        refuse_what_cannot_fit(pending, local_gpu())
    executor = make_executor(cluster, folder, timeout_min, slurm, pending)
    started = time.time()
    ignore_sigint = children_ignore_sigint() if cluster == "local" else contextlib.nullcontext()
    if cluster == "slurm":
        groups = [[c] for c in pending]
        limit = (slurm or SlurmConfig()).array_limit
        jobs = []
        for lo in range(0, len(groups), limit):
            chunk = groups[lo : lo + limit]
            jobs += executor.map_array(CellJob(name), chunk, [str(root)] * len(chunk))
    else:
        n_jobs = 1 if cluster == "debug" else min(len(pending), workers or local_slots(pending, slots))
        groups = [pending[i::n_jobs] for i in range(n_jobs)]
        gpus = slots if cluster == "local" else []
        with ignore_sigint:
            jobs = submit_groups(executor, CellJob(name), groups, str(root), gpus, ranks_per_cell(pending))
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    mine = {
        cell_key(cell, root): {
            "job_id": str(job.job_id),
            "cluster": cluster,
            "host": socket.gethostname(),
            "submitted": now,
        }
        for job, group in zip(jobs, groups, strict=True)
        for cell in group
    }
    with locked(folder / "jobs.json"):  # another launcher may have added its jobs meanwhile
        write_json_atomic(folder / "jobs.json", {**load_registry(folder), **mine})
    report.job_ids = [str(j.job_id) for j in jobs]
    if cluster == "slurm":
        return report
    if cluster == "local":
        try:
            with sigterm_as_interrupt():
                _wait(jobs, pending, root, progress, started)
        except KeyboardInterrupt:
            stop_local_jobs(jobs)
            raise
    for job in jobs:  # the debug executor runs a job when its result is asked for
        statuses, errors = _result(job)
        report.job_errors += errors
        report.taken_elsewhere += sum(s in (IN_FLIGHT_ELSEWHERE, ALREADY_COMPLETED) for s in statuses)
    return report


def local_slots(cells: list[Cell], gpus: list[int]) -> int:
    """Parallel local jobs by default: one per core; for a GPU task one per ``train.nproc`` visible
    GPUs, or one at a time on CPU when there is none (each would load the task's large models into
    host memory)."""
    if not needs_gpu(cells):
        return usable_cores()
    return max(1, len(gpus) // ranks_per_cell(cells))


def ranks_per_cell(cells: list[Cell]) -> int:
    return max(c.config().train.nproc for c in cells)


def submit_groups(
    executor, fn, groups: list, root: str, gpus: list[int], per_job: int = 1
) -> list[submitit.Job]:
    """One job per group; with ``gpus``, job i sees only its own ``per_job`` of them (the ranks of
    a ``train.nproc`` cell), dealt in turn. Without, submitit's local executor hides every GPU,
    which is what a CPU task wants."""
    if not gpus:
        return executor.map_array(fn, groups, [root] * len(groups))
    sets = [tuple(gpus[k : k + per_job]) for k in range(0, len(gpus) - per_job + 1, per_job)] or [tuple(gpus)]
    jobs = []
    for i, group in enumerate(groups):
        mine = sets[i % len(sets)]
        executor.update_parameters(gpus_per_node=len(mine), visible_gpus=mine)
        jobs.append(executor.submit(fn, group, root))
    return jobs


def _prepare(task: str, overrides: list[str]) -> str:
    from bench.loops.config import build_config

    return tasks.get(task).prepare(build_config(task, "rebel", overrides).task)


def prepare_job(task: str, overrides: list[str], cluster: str, root: Path, slurm: SlurmConfig | None) -> str:
    """``bench prepare`` as one job on ``cluster`` (with the task's GPU, on SLURM or locally), waited
    for; returns the prepared artifact folder."""
    cell = Cell(task, "rebel", 0, tuple(overrides))
    folder = Path(root).resolve() / ".prepare" / task
    executor = make_executor(cluster, folder, 24 * 60, slurm, [cell])
    slots = visible_gpu_ids() if cluster == "local" and needs_gpu([cell]) else []
    if slots:
        executor.update_parameters(gpus_per_node=1, visible_gpus=(slots[0],))
    job = executor.submit(_prepare, task, list(overrides))
    if cluster != "debug":
        print(f"preparation job {job.job_id} on {cluster}; logs under {folder / 'submitit'}")
    return job.result()


def _result(job: submitit.Job) -> tuple[list[str], list[str]]:
    """The job's cell statuses and its error (none when it ended normally)."""
    try:
        return job.result(), []
    except Exception as err:  # the job itself died (killed, timed out): its cells lack records
        return [], [f"job {job.job_id}: {type(err).__name__}: {str(err).strip().splitlines()[-1]}"]


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Local jobs started within inherit an ignored SIGINT. A Ctrl-C at the terminal reaches the
    whole process group, and submitit's local controller would answer it by killing its tasks a
    second later, mid-step; instead the launcher asks them to stop (``stop_local_jobs``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the launcher (``kill``, a scheduler) is handled as Ctrl-C is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_local_jobs(jobs: list[submitit.Job], grace_s: float = 600.0) -> None:
    """SIGTERM to every running local job (its controller forwards it to the task, whose running
    cell checkpoints at the end of its iteration and stops), then wait up to ``grace_s`` for them;
    a second Ctrl-C, or the grace period, kills what is left."""
    live = [j for j in jobs if getattr(j, "_process", None) is not None and j._process.poll() is None]
    for job in live:
        job._process.send_signal(signal.SIGTERM)
    print(f"\nstopping {len(live)} local jobs: each checkpoints its cell (Ctrl-C again to kill them)")
    deadline = time.time() + grace_s
    try:
        while any(j._process.poll() is None for j in live) and time.time() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    for job in live:
        if job._process.poll() is None:
            kill_tree(job._process.pid)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (Linux ``/proc``; elsewhere the process alone): a
    killed local controller would leave its task running."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for kid in kids:
        kill_tree(kid)


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


def sweep_cells(root: Path, name: str) -> tuple[list[Cell], Callable[[Cell], tuple[str, str]]]:
    """A launched sweep's cells and a function giving each one's ``(status, reason)`` now (the
    job registry and SLURM's states read once)."""
    root = Path(root).resolve()
    folder = root / ".sweeps" / name
    cells_file = folder / "cells.json"
    if not cells_file.exists():
        known = sorted(p.name for p in (root / ".sweeps").glob("*")) if (root / ".sweeps").exists() else []
        raise FileNotFoundError(
            f"no launched sweep {name!r} under {root}; launched: {', '.join(known) or 'none'}"
        )
    cells = [Cell(c["task"], c["method"], c["seed"], tuple(c["overrides"])) for c in read_json(cells_file)]
    registry = load_registry(folder)
    states = slurm_states([v["job_id"] for v in registry.values() if v["cluster"] == "slurm"])
    return cells, lambda cell: cell_status(cell, root, registry, states)


def sweep_status(root: Path, name: str) -> list[tuple[Cell, str, str]]:
    """Every cell of a launched sweep with its status and reason."""
    cells, status = sweep_cells(root, name)
    return [(c, *status(c)) for c in cells]
