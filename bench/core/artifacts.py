"""Cached artifacts of preparation stages (SFT policies, reward classifiers), keyed by their inputs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$BENCH_CACHE_DIR``, default ``~/.cache/bench``: presets, prepared models, caches."""
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "bench")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive file lock next to ``path`` (concurrent workers build an artifact once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def artifact_dir(kind: str, spec: dict) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{kind}-{key}"


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's RNG streams as they were before the block: building a cached
    artifact (which seeds and draws) must not make a run's numbers depend on a cold or warm cache."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` unless ``path`` is complete; publish atomically (a lock guards workers).
    The caller's RNG streams are left as they were (``preserved_rng``)."""
    if (path / "DONE").exists():
        return path
    with locked(path), preserved_rng():
        if not (path / "DONE").exists():
            tmp = path.with_name(path.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build(tmp)
            (tmp / "DONE").write_text("ok\n")
            shutil.rmtree(path, ignore_errors=True)
            tmp.replace(path)
    return path


def require(path: Path, task: str) -> Path:
    if not (path / "DONE").exists():
        raise RuntimeError(
            f"task {task} needs its prepared artifacts at {path}: run `bench prepare {task}` with the same "
            "task.* overrides first (SFT of the policy and, where the task has one, the reward classifier)"
        )
    return path
