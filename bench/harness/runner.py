"""Run one cell (task x method x config x seed) and write its record, whatever happens."""

from __future__ import annotations

import copy
import datetime as dt
import fcntl
import hashlib
import importlib
import json
import os
import random
import socket
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

import methods
import tasks
from bench.harness.records import SCHEMA, environment, git_commit, read_json, write_json_atomic
from bench.loops.callbacks import CHECKPOINT, Interrupted, OnEval, StopRun, stop_on_signals, stop_requested
from bench.loops.config import build_config, config_hash, method_radius, to_dict
from bench.loops.distributed import remove_shards
from bench.loops.monitor import Monitor

# The loop of each kind of task, imported when a cell runs (listing and planning stay cheap).
TRAINERS = {
    "linear": "bench.loops.linear:train",
    "lm": "bench.loops.train:train",
    "rm": "bench.loops.reward_model:train",
}


@dataclass(frozen=True)
class Cell:
    """One unit of work. ``overrides`` are ``key=value`` strings applied to the task's defaults;
    ``tags`` label the record (e.g. ``tuned:<study>``) without entering the config hash."""

    task: str
    method: str
    seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)
    tags: tuple[str, ...] = field(default_factory=tuple)
    # train.shard=auto as the job resolved it on its node (bench.harness.plan.with_resolved_shard)
    shard: str = field(default="", compare=False)

    def config(self) -> DictConfig:
        """The cell's run config, a copy of the one built once per cell (building takes ~0.05-0.1 s,
        a copy ~5 ms; plans and sweeps ask for it several times a cell)."""
        return copy.deepcopy(self._config)

    @cached_property
    def _config(self) -> DictConfig:
        return build_config(self.task, self.method, self.overrides, self.seed)

    @cached_property
    def config_hash(self) -> str:
        """``config_hash`` of the cell's config, computed once."""
        return config_hash(self._config)

    def __getstate__(self) -> dict:
        """Pickled (to a job) without the built config: the job builds its own."""
        return {k: v for k, v in self.__dict__.items() if k != "_config"}

    def run_dir(self, root: Path) -> Path:
        return Path(root) / self.task / self.method / self.config_hash / f"seed-{self.seed}"

    def label(self) -> str:
        extra = f" {' '.join(self.overrides)}" if self.overrides else ""
        return f"{self.task}/{self.method} seed={self.seed}{extra}"


def record_path(cell: Cell, root: Path) -> Path:
    return cell.run_dir(root) / "record.json"


def is_completed(cell: Cell, root: Path) -> bool:
    path = record_path(cell, root)
    try:
        return path.exists() and read_json(path).get("status") == "completed"
    except (OSError, ValueError):
        return False


def seed_everything(seed: int) -> dict:
    """Seed Python, NumPy and torch from the config seed; return the effective seeds."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return {"python": seed, "numpy": seed % 2**32, "torch": seed, "generator": seed}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def record_header(cell: Cell, cfg: DictConfig) -> dict:
    """What every record of ``cell`` starts with: what ran, its config and hash, its radius."""
    knob = methods.get(cell.method).knob
    return {
        "schema": SCHEMA,
        "task": cell.task,
        "method": cell.method,
        "seed": cell.seed,
        "overrides": list(cell.overrides),
        "tags": list(cell.tags),
        "config": to_dict(cfg),
        "config_hash": cell.config_hash,
        "radius": {"name": knob.name, "value": method_radius(cfg)} if knob else None,
    }


IN_FLIGHT_ELSEWHERE = "in-flight"  # run_cell's status for a cell another live process owns
INTERRUPTED = "interrupted"  # run_cells' status for a cell stopped (checkpointed) or not begun
ALREADY_COMPLETED = "already-completed"  # run_cell's status for a cell another job finished first
OWNER = ".owner"  # the per-cell lock file in the run folder


@contextmanager
def cell_owner(run_dir: Path) -> Iterator[bool]:
    """Whether this process owns the cell at ``run_dir``: an exclusive, non-blocking ``flock`` on
    its ``.owner`` file, held for the block, with the holder's host and pid written in it. The
    kernel drops the lock when its holder dies, so a cell whose owner was killed is taken over by
    the next launcher, and one whose owner lives is left to it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / OWNER, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}))
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def live_owner(run_dir: Path) -> dict | None:
    """The host and pid of the live process that owns the cell at ``run_dir``, or None (read only:
    works on a read-only results folder)."""
    path = run_dir / OWNER
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(handle.read() or "{}")
            except ValueError:
                return {}
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def run_cell(cell: Cell, root: Path, on_eval: OnEval | None = None, sweep: str = "") -> str:
    """Train and evaluate one cell; write ``record.json`` atomically; return the status.

    One cell, one owner (``cell_owner``): a cell that another live process is running is left to
    it (status ``in-flight``), and one completed meanwhile is not trained again
    (``already-completed``). ``on_eval(iteration, scores)`` is called after every evaluation; if it
    raises ``StopRun`` the record says ``pruned``
    and the exception propagates. ``sweep`` names the tracker runs' group.
    """
    cfg = cell.config()
    if cfg.train.nproc > 1 and in_rank_environment(cfg.train.nproc):
        return _run_here(cell, Path(root), cfg, on_eval, sweep)  # one rank: its launcher owns the cell
    with cell_owner(cell.run_dir(root)) as owned:
        if not owned:
            return IN_FLIGHT_ELSEWHERE
        if is_completed(cell, root):
            return ALREADY_COMPLETED
        if cfg.train.nproc > 1:
            return launch_ranks(cell, Path(root), cfg.train.nproc, sweep)
        return _run_here(cell, Path(root), cfg, on_eval, sweep)


def cell_monitor(cell: Cell, root: Path, cfg: DictConfig, sweep: str = "") -> Monitor:
    """The cell's live metrics and its trackers (``train.report_to``): one tracker run per cell,
    named by its label, grouped by sweep, tagged with method, task and radius, the config as its
    hyperparameters, and an id that is the same when the cell resumes."""
    run_dir, names = cell.run_dir(root), list(cfg.train.report_to)
    run = None
    if names:
        from bench.loops.trackers import TrackerRun

        knob = methods.get(cell.method).knob
        radius = (f"radius:{knob.name}={method_radius(cfg):g}",) if knob else ()
        run = TrackerRun(
            run_dir=run_dir,
            results_root=Path(root),
            name=cell.label(),
            run_id=hashlib.sha256(str(run_dir.relative_to(root)).encode()).hexdigest()[:32],
            project=f"bench-{cell.task}",
            group=sweep,
            tags=(f"method:{cell.method}", f"task:{cell.task}", *radius, *cell.tags),
            config=to_dict(cfg),
            resume_step=None,
        )
    return Monitor(run_dir, names, run, rank=int(os.environ.get("RANK", "0")))


def _run_here(cell: Cell, root: Path, cfg: DictConfig, on_eval: OnEval | None, sweep: str = "") -> str:
    """``run_cell``'s body in this process (or this rank): train, then write the record."""
    record = {
        **record_header(cell, cfg),
        "git": git_commit(),
        "environment": environment(),
        "started": _now(),
        "pid": os.getpid(),
    }
    try:
        if cell.shard:  # what auto resolved to (cfg is this call's copy); the record keeps "auto"
            cfg.train.shard = cell.shard
        torch.set_num_threads(max(1, cfg.train.threads))  # float sums depend on the thread count
        record["seeds"] = seed_everything(cfg.seed)
        spec = tasks.get(cell.task)
        module, attr = TRAINERS[spec.trainer].split(":")
        train = getattr(importlib.import_module(module), attr)
        with cell_monitor(cell, root, cfg, sweep) as monitor:
            record.update(train(cfg, spec.build(cfg.task), cell.run_dir(root), on_eval, monitor))
        record["status"] = "completed"
    except StopRun as stop:
        record.update(status="pruned", error={"type": "StopRun", "message": str(stop), "traceback": ""})
        record["finished"] = _now()
        write_json_atomic(record_path(cell, root), record)
        raise
    except Exception as err:  # a failed cell is recorded, never raised into the sweep
        record["status"] = "failed"
        record["error"] = {
            "type": type(err).__name__,
            "message": str(err),
            "traceback": traceback.format_exc(),
        }
    record["finished"] = _now()
    if int(os.environ.get("RANK", "0")) == 0:  # with train.nproc ranks, rank 0 writes the record
        write_json_atomic(record_path(cell, root), record)
        if record["status"] == "completed":  # only now: a kill before the record keeps the checkpoint
            remove_shards(cell.run_dir(root))  # first: a kill between the two leaves no orphans
            (cell.run_dir(root) / CHECKPOINT).unlink(missing_ok=True)
    return record["status"]


def in_rank_environment(nproc: int) -> bool:
    """Whether this process is one of ``nproc`` ranks: under ``torch.distributed.run`` (its
    ``WORLD_SIZE``), or one of ``nproc`` SLURM tasks of a submitit job, whose rendezvous
    variables submitit's ``TorchDistributedEnvironment`` then exports."""
    if int(os.environ.get("WORLD_SIZE", "1")) == nproc:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) == nproc and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return True
    return False


def launch_ranks(cell: Cell, root: Path, nproc: int, sweep: str = "") -> str:
    """Run ``cell`` as ``nproc`` local ranks through ``torch.distributed.run`` and wait; a run that
    dies without a record (a rank crashed or was killed) is recorded as failed with the ranks' log."""
    import socket
    import subprocess
    import sys

    run_dir = cell.run_dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = json.dumps(
        {
            "task": cell.task,
            "method": cell.method,
            "seed": cell.seed,
            "overrides": cell.overrides,
            "tags": cell.tags,
            "sweep": sweep,
            "shard": cell.shard,
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "bench.harness.runner",
        str(root),
        spec,
    ]
    threads = str(max(1, cell.config().train.threads))
    log = run_dir / "ranks.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=threads)
        )
    path = record_path(cell, root)
    if proc.returncode == 0 and path.exists():
        return read_json(path)["status"]
    tail = log.read_text()[-4000:]
    record = {
        **record_header(cell, cell.config()),
        "status": "failed",
        "error": {
            "type": "RanksFailed",
            "message": f"{nproc} ranks exited with {proc.returncode}",
            "traceback": tail,
        },
        "finished": _now(),
    }
    write_json_atomic(path, record)
    return "failed"


def run_cells(cells: list[Cell], root: str, sweep: str = "") -> list[str]:
    """A job's body: run its cells in order (the unit submitit schedules).

    A cell already completed is left alone (``run_cell``): a requeued job whose cell finished
    meanwhile (SLURM lets a job run ``KillWait`` seconds after ``scontrol requeue``) does not train
    it again, and neither does a second launcher of the same sweep.
    """
    statuses = []
    with stop_on_signals():  # SIGINT/SIGTERM: the running cell checkpoints, the rest wait
        for cell in cells:
            try:
                statuses.append(INTERRUPTED if stop_requested() else run_cell(cell, Path(root), sweep=sweep))
            except Interrupted:
                statuses.append(INTERRUPTED)
    return statuses


def main(argv: list[str]) -> None:
    """One rank of a ``train.nproc`` cell: ``python -m bench.harness.runner ROOT CELL_JSON``."""
    spec = json.loads(argv[1])
    cell = Cell(
        spec["task"],
        spec["method"],
        spec["seed"],
        tuple(spec["overrides"]),
        tuple(spec["tags"]),
        spec["shard"],
    )
    run_cell(cell, Path(argv[0]), sweep=spec["sweep"])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
