"""Run records: self-describing JSON, written atomically; the only input of every report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
PACKAGES = ("bench", "torch", "transformers", "numpy", "scipy", "submitit", "optuna", "omegaconf")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    """Every record under ``root`` (``results/`` or a task's folder), each with its path."""
    out = []
    for path in sorted(Path(root).rglob("record.json")):
        try:
            rec = read_json(path)
        except (OSError, json.JSONDecodeError) as err:
            rec = {"status": "unreadable", "error": {"message": str(err)}}
        rec["path"] = str(path)
        out.append(rec)
    return out
