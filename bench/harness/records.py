"""Run records: self-describing JSON, written atomically; the only input of every report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import warnings
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
PACKAGES = ("bench", "torch", "transformers", "numpy", "scipy", "submitit", "optuna", "omegaconf")


def umask() -> int:
    """The process's file-creation mask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``. The file
    gets the permissions of any file the user creates (0666 less the umask, so a shared cluster
    group can read records), not the 0600 of a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


@cache
def git_commit() -> dict:
    """The commit of the checkout bench runs from, and whether it had uncommitted changes."""
    root = Path(__file__).resolve().parents[2]  # the checkout: bench/harness/records.py
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


@cache
def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "packages": versions,
    }


def iter_records(root: Path) -> list[dict]:
    """Every readable record under ``root`` (``results/`` or a task's folder), each with its path.
    A file that is not a record (unreadable, not UTF-8 JSON, truncated, not an object naming its
    task and status) is skipped with a warning naming it, and the others are still read."""
    out = []
    for path in sorted(Path(root).rglob("record.json")):
        try:
            rec = read_json(path)
            if not isinstance(rec, dict) or not {"task", "status"} <= set(rec):
                raise ValueError("not a record: no task and status")
        except (OSError, ValueError) as err:  # JSON and UTF-8 decoding errors are ValueErrors
            warnings.warn(f"skipping unreadable record {path}: {err}", RuntimeWarning, stacklevel=2)
            continue
        rec["path"] = str(path)
        out.append(rec)
    return out
