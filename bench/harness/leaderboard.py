"""Leaderboards from run records alone: methods ranked by worst-case reward on test mixtures.

Records are grouped by (task, method, config hash): seeds of one config are aggregated (mean,
sample std, count, 95% t-interval), different configs of a method stay separate rows. Failed and
incomplete cells are listed apart and never ranked.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
from scipy import stats

import tasks
from bench.harness.records import iter_records, read_json

METRICS = ("worst_case", "mean_over_test", "train_reward", "val_worst_case", "kl_ref")


def load_records(root: Path, task: str | None = None, sweep: str | None = None) -> list[dict]:
    """Records under ``root``, optionally of one task and/or of one launched sweep's cells."""
    records = [r for r in iter_records(root) if not task or r.get("task") == task]
    if sweep:
        cells_file = Path(root) / ".sweeps" / sweep / "cells.json"
        if not cells_file.exists():
            raise FileNotFoundError(f"no launched sweep {sweep!r} under {root}")
        keys = {c["key"] for c in read_json(cells_file)}
        records = [r for r in records if str(Path(r["path"]).parent.relative_to(Path(root))) in keys]
    return records


def context_hash(config: dict) -> str:
    """Hash of a config without its method section and seed: runs that differ only in method."""
    rest = {k: v for k, v in config.items() if k not in ("method", "seed")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:12]


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: identity, status, radius, size, scale, final metrics, capabilities."""
    rows = []
    for rec in records:
        radius = rec.get("radius") or {}
        tuned = any(t.startswith("tuned:") for t in rec.get("tags", []))
        row = {
            "task": rec.get("task"),
            "method": rec.get("method"),
            "config_hash": rec.get("config_hash"),
            "context_hash": context_hash(rec.get("config", {})),
            "seed": rec.get("seed"),
            "status": rec.get("status"),
            "radius_name": radius.get("name"),
            "radius_value": radius.get("value", math.nan),
            "radius": (f"{radius['name']}={radius['value']:.4g}" if radius else "-")
            + (" (tuned)" if tuned else ""),
            "size": _config_value(rec, "size_key"),
            "scale": _config_value(rec, "scale_key"),
            "error": (rec.get("error") or {}).get("message"),
            "path": rec["path"],
        }
        metrics = rec.get("metrics") or {}
        row.update({k: metrics.get(k) for k in METRICS})
        caps = (rec.get("capabilities") or {}).items()  # flags (how a task was scored) are not scores
        row.update({f"cap:{k}": v for k, v in caps if not isinstance(v, bool)})
        rows.append(row)
    columns = [
        "task",
        "method",
        "config_hash",
        "context_hash",
        "seed",
        "status",
        "radius_name",
        "radius_value",
        "radius",
        "size",
        "scale",
        *METRICS,
        "error",
        "path",
    ]
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*columns, *sorted(c for c in frame.columns if c.startswith("cap:"))])


def _config_value(rec: dict, which: str) -> str:
    """The record's model size or data scale, read through its task's declared config key."""
    try:
        key = getattr(tasks.get(rec["task"]), which)
    except LookupError:
        return "-"
    node = rec.get("config", {})
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "-" if node is None else str(node)


def t_halfwidth(values: pd.Series) -> float:
    """Half-width of the 95% Student-t interval of the mean over seeds (NaN for one seed)."""
    n = values.count()
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed records aggregated over seeds per config; ranked by mean worst-case reward."""
    done = frame[frame.status == "completed"]
    if done.empty:
        return pd.DataFrame()
    keys = ["task", "method", "config_hash", "context_hash", "radius", "radius_value", "size", "scale"]
    caps = [c for c in done.columns if c.startswith("cap:")]
    grouped = done.groupby(keys, dropna=False)
    agg = grouped.agg(
        worst_case=("worst_case", "mean"),
        worst_case_std=("worst_case", "std"),
        worst_case_ci=("worst_case", t_halfwidth),
        seeds=("seed", "nunique"),
        mean_over_test=("mean_over_test", "mean"),
        train_reward=("train_reward", "mean"),
        kl_ref=("kl_ref", "mean"),
        **{c: (c, "mean") for c in caps},
    ).reset_index()
    agg["worst_case_std"] = agg["worst_case_std"].fillna(0.0)
    agg = agg.sort_values(["task", "worst_case"], ascending=[True, False]).reset_index(drop=True)
    agg.insert(0, "rank", agg.groupby("task").cumcount() + 1)
    return agg


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.status != "completed"][["task", "method", "config_hash", "seed", "status", "error"]]


def format_leaderboard(board: pd.DataFrame) -> str:
    """The terminal leaderboard (Markdown)."""
    if board.empty:
        return "(no completed runs)"
    shown = board.assign(
        worst_case=[f"{m:.4f} ± {s:.4f}" for m, s in zip(board.worst_case, board.worst_case_std, strict=True)]
    )
    shown = shown[
        [
            "rank",
            "task",
            "method",
            "config_hash",
            "radius",
            "size",
            "scale",
            "worst_case",
            "seeds",
            "mean_over_test",
            "train_reward",
            "kl_ref",
        ]
    ]
    names = {
        "worst_case": "worst-case (mean ± std)",
        "mean_over_test": "mean test",
        "train_reward": "train mix",
        "kl_ref": "KL(ref)",
        "config_hash": "config",
    }
    if all(_is_reward_model_task(t) for t in board.task):  # accuracies, not rewards
        names |= {
            "worst_case": "worst OOD acc (mean ± std)",
            "mean_over_test": "mean OOD acc",
            "train_reward": "ID acc",
        }
        shown = shown.drop(columns=["kl_ref"])
    return shown.rename(columns=names).to_markdown(index=False, floatfmt=".4f")


def _is_reward_model_task(name: str) -> bool:
    try:
        return tasks.get(name).trainer == "rm"
    except LookupError:
        return False
