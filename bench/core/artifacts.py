"""Cached artifacts of preparation stages (SFT policies, reward classifiers), keyed by their inputs."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
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


def load_tensors(path: Path, allowed: Sequence[type] = (), map_location=None) -> object:
    """``torch.load`` that cannot run code: the weights-only unpickler (tensors, containers,
    numbers, strings) plus the classes in ``allowed``, which must be plain data (dataclasses of
    tensors). A file holding anything else, such as a pickled callable, is refused with
    ``pickle.UnpicklingError`` before any of it runs."""
    import torch

    with torch.serialization.safe_globals(list(allowed)):
        return torch.load(path, weights_only=True, map_location=map_location)


def load_or_set_aside(path: Path, what: str, allowed: Sequence[type] = (), map_location=None) -> object:
    """``load_tensors(path)``, or None when there is no file. One that cannot be read (truncated, or
    holding objects the weights-only unpickler refuses, which therefore never ran) is moved aside to
    ``<name>.unreadable``, named in a warning, so that the caller starts that ``what`` afresh."""
    if not path.exists():
        return None
    try:
        return load_tensors(path, allowed, map_location)
    except Exception as err:  # torch raises many types for a bad file
        first = (str(err).splitlines() or [""])[0][:160]
        set_aside(path, what, f"{type(err).__name__}: {first}")
        return None


def set_aside(path: Path, what: str, why: str) -> None:
    """Move an unusable ``path`` to ``<name>.unreadable``, named in a warning (the caller starts
    that ``what`` afresh)."""
    aside = path.with_name(path.name + ".unreadable")
    path.replace(aside)
    warnings.warn(
        f"unreadable {what} {path} ({why}); moved to {aside.name}, starting afresh",
        RuntimeWarning,
        stacklevel=3,
    )


def save_tensors(path: Path, value: object) -> None:
    """``torch.save`` atomically: to a temp file unique to this process, then renamed (a failed
    write removes its temp file)."""
    import torch

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(value, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
