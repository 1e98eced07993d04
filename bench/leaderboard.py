"""Leaderboards from run records alone: methods ranked by worst-case reward on test mixtures.

Records are grouped by (task, method, config hash): seeds of one config are aggregated (mean,
sample std, count), different configs of a method stay separate rows. Failed cells are listed
apart and never ranked.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import tasks
from bench.records import iter_records

METRICS = ("worst_case", "mean_over_test", "train_reward", "val_worst_case", "kl_ref")


def records_frame(root: Path, task: str | None = None) -> pd.DataFrame:
    """One row per record: identity, status, radius and the final metrics."""
    rows = []
    for rec in iter_records(root):
        if task and rec.get("task") != task:
            continue
        radius = rec.get("radius") or {}
        row = {
            "task": rec.get("task"),
            "method": rec.get("method"),
            "config_hash": rec.get("config_hash"),
            "seed": rec.get("seed"),
            "status": rec.get("status"),
            "radius": (f"{radius['name']}={radius['value']:.4g}" if radius else "-")
            + (" (tuned)" if any(t.startswith("tuned:") for t in rec.get("tags", [])) else ""),
            "size": _config_value(rec, "size_key"),
            "scale": _config_value(rec, "scale_key"),
            "error": (rec.get("error") or {}).get("message"),
            "path": rec["path"],
        }
        metrics = rec.get("metrics") or {}
        row.update({k: metrics.get(k) for k in METRICS})
        rows.append(row)
    columns = ["task", "method", "config_hash", "seed", "status", "radius", "size", "scale", *METRICS]
    return pd.DataFrame(rows, columns=[*columns, "error", "path"])


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


def leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed records aggregated over seeds per config; ranked by mean worst-case reward."""
    done = frame[frame.status == "completed"]
    if done.empty:
        return pd.DataFrame()
    keys = ["task", "method", "config_hash", "radius", "size", "scale"]
    agg = (
        done.groupby(keys, dropna=False)
        .agg(
            worst_case=("worst_case", "mean"),
            worst_case_std=("worst_case", "std"),
            seeds=("seed", "nunique"),
            mean_over_test=("mean_over_test", "mean"),
            train_reward=("train_reward", "mean"),
            kl_ref=("kl_ref", "mean"),
        )
        .reset_index()
    )
    agg["worst_case_std"] = agg["worst_case_std"].fillna(0.0)
    agg = agg.sort_values(["task", "worst_case"], ascending=[True, False]).reset_index(drop=True)
    agg.insert(0, "rank", agg.groupby("task").cumcount() + 1)
    return agg


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.status != "completed"][["task", "method", "config_hash", "seed", "status", "error"]]


def format_leaderboard(board: pd.DataFrame) -> str:
    if board.empty:
        return "(no completed runs)"
    shown = board.assign(
        worst_case=[f"{m:.4f} ± {s:.4f}" for m, s in zip(board.worst_case, board.worst_case_std, strict=True)]
    ).drop(columns=["worst_case_std"])
    shown = shown.rename(
        columns={
            "worst_case": "worst-case (mean ± std)",
            "mean_over_test": "mean test",
            "train_reward": "train mix",
            "kl_ref": "KL(ref)",
            "config_hash": "config",
        }
    )
    return shown.to_markdown(index=False, floatfmt=".4f")
