"""Run one cell (task x method x config x seed) and write its record, whatever happens."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

import methods
import tasks
from bench.harness.records import SCHEMA, environment, git_commit, read_json, write_json_atomic
from bench.loops.callbacks import OnEval, StopRun
from bench.loops.config import build_config, config_hash, method_radius, to_dict

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

    def config(self) -> DictConfig:
        return build_config(self.task, self.method, self.overrides, self.seed)

    def run_dir(self, root: Path) -> Path:
        return Path(root) / self.task / self.method / config_hash(self.config()) / f"seed-{self.seed}"

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


def run_cell(cell: Cell, root: Path, on_eval: OnEval | None = None) -> str:
    """Train and evaluate one cell; write ``record.json`` atomically; return the status.

    ``on_eval(iteration, scores)`` is called after every evaluation; if it raises ``StopRun`` the
    record says ``pruned`` and the exception propagates.
    """
    cfg = cell.config()
    knob = methods.get(cell.method).knob
    record = {
        "schema": SCHEMA,
        "task": cell.task,
        "method": cell.method,
        "seed": cell.seed,
        "overrides": list(cell.overrides),
        "tags": list(cell.tags),
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "radius": {"name": knob.name, "value": method_radius(cfg)} if knob else None,
        "git": git_commit(),
        "environment": environment(),
        "started": _now(),
        "pid": os.getpid(),
    }
    try:
        torch.set_num_threads(max(1, cfg.train.threads))  # float sums depend on the thread count
        record["seeds"] = seed_everything(cfg.seed)
        spec = tasks.get(cell.task)
        module, attr = TRAINERS[spec.trainer].split(":")
        train = getattr(importlib.import_module(module), attr)
        record.update(train(cfg, spec.build(cfg.task), cell.run_dir(root), on_eval=on_eval))
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
    write_json_atomic(record_path(cell, root), record)
    return record["status"]


def run_cells(cells: list[Cell], root: str) -> list[str]:
    """A job's body: run its cells in order (the unit submitit schedules).

    A cell already completed is left alone: a requeued job whose cell finished meanwhile (SLURM
    lets a job run ``KillWait`` seconds after ``scontrol requeue``) does not train it again.
    """
    return ["completed" if is_completed(c, Path(root)) else run_cell(c, Path(root)) for c in cells]
