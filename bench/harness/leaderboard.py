"""Leaderboards from run records alone: methods ranked by worst-case reward on test mixtures.

Records are grouped by (task, method, config hash): seeds of one config are aggregated (mean,
sample std, count, 95% t-interval), different configs of a method stay separate rows. Failed and
incomplete cells are listed apart and never ranked.

The ranking metric is the worst case selected on validation prompts and scored on test prompts
(``worst_case_selected``): the plain minimum over noisy test means is biased low and its argmin
jumps between mixtures (the winner's curse), so it is shown beside it but does not rank. Methods of
a seed are scored on the same prompts with the same sampling streams, so rows are compared prompt by
prompt (``bench.harness.stats``): the rank column is a bootstrap interval over seeds and prompts,
and each robust method's difference from its base has a cluster-robust 95% interval and a
Holm-corrected p-value. Records from before per-prompt scores rank by the minimum, compared on
their per-seed values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as scipy_stats

import methods
import tasks
from bench.harness import stats
from bench.harness.records import iter_records, read_json
from tasks.mixtures import mix_rewards

METRICS = ("worst_case", "worst_case_selected", "mean_over_test", "train_reward", "val_worst_case", "kl_ref")
ALPHA = 0.05


def load_records(root: Path, task: str | None = None, sweep: str | None = None) -> list[dict]:
    """Records under ``root``, optionally of one task and/or of one launched sweep's cells; tuning
    trials (under ``tune/``, trained on the tuning seed to pick parameters) are never among them."""
    trials = Path(root).resolve() / "tune"
    records = [
        r
        for r in iter_records(root)
        if (not task or r.get("task") == task) and trials not in Path(r["path"]).resolve().parents
    ]
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
        row = {
            "task": rec.get("task"),
            "method": rec.get("method"),
            "config_hash": rec.get("config_hash"),
            "context_hash": context_hash(rec.get("config", {})),
            "seed": rec.get("seed"),
            "status": rec.get("status"),
            "radius_name": radius.get("name"),
            "radius_value": radius.get("value", math.nan),
            "radius": f"{radius['name']}={radius['value']:.4g}" if radius else "-",
            "strength": strength_text(rec),
            "tuned": tuning_text(rec.get("tags", [])),
            "tuning_budget": tuning_budget(rec.get("tags", [])),
            "size": _config_value(rec, "size_key"),
            "scale": _config_value(rec, "scale_key"),
            "error": (rec.get("error") or {}).get("message"),
            "path": rec["path"],
        }
        metrics = rec.get("metrics") or {}
        row.update({k: metrics.get(k) for k in METRICS})
        row["prompt_values"] = selected_prompt_values(metrics)
        row["frontier"] = frontier_points(rec)
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
        "strength",
        "tuned",
        "tuning_budget",
        "size",
        "scale",
        *METRICS,
        "prompt_values",
        "frontier",
        "error",
        "path",
    ]
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[*columns, *sorted(c for c in frame.columns if c.startswith("cap:"))])


def strength_text(rec: dict) -> str:
    """``beta=0.1`` or ``eta=0.01``: the record's regularization strength toward the reference."""
    name = methods.get(rec["method"]).strength if rec.get("method") in methods.METHODS else None
    value = (rec.get("config", {}).get("method") or {}).get(name) if name else None
    return f"{name}={value:.4g}" if isinstance(value, int | float) else "-"


def tuning_budget(tags: list[str]) -> int:
    """The trial budget a tuned record's parameters were chosen with (0: not tuned, or unknown)."""
    found = dict(t.split(":", 1) for t in tags if ":" in t)
    return int(found.get("tuning-budget", 0))


def tuning_text(tags: list[str]) -> str:
    """``8 trials: tau, beta`` for a cell run at a study's best parameters (``bench tune
    --then-test``); ``yes`` for one tagged before budgets were recorded; ``-`` when not tuned."""
    found = dict(t.split(":", 1) for t in tags if ":" in t)
    if "tuned" not in found:
        return "-"
    if "tuning-budget" not in found:
        return "yes"
    keys = found.get("tuned-keys", "").replace(",", ", ")
    return f"{found['tuning-budget']} trials" + (f": {keys}" if keys else "")


def selected_prompt_values(metrics: dict) -> list[float] | None:
    """Each test prompt's reward at the record's validation-selected worst mixture, or for a reward
    model each test pair's 0/1 on its validation-selected worst OOD set (None for a record from
    before per-prompt scores)."""
    if metrics.get("per_pair") and metrics.get("selected_set") in metrics["per_pair"]:
        return [float(v) for v in metrics["per_pair"][metrics["selected_set"]]]
    per_prompt, name = metrics.get("per_prompt"), metrics.get("selected_mixture")
    if not per_prompt or name not in (metrics.get("mixtures") or {}):
        return None
    mixture = metrics["mixtures"][name]
    heads = torch.tensor(per_prompt["test"], dtype=torch.float64)
    weights = torch.tensor(mixture["weights"], dtype=torch.float64)
    return mix_rewards(heads, weights, mixture.get("kind", "convex")).tolist()


def frontier_points(rec: dict) -> list[tuple[float, float]]:
    """``(KL to the reference, worst case)`` at every evaluation of a record (the val-selected worst
    case where the record has it), from its learning curve."""
    key = "worst_case_selected" if "worst_case_selected" in (rec.get("metrics") or {}) else "worst_case"
    return [
        (float(c["kl_ref"]), float(c[key]))
        for c in rec.get("curves") or []
        if c.get("kl_ref") is not None and c.get(key) is not None
    ]


def kl_matched(points: list[tuple[float, float]], budget: float) -> float:
    """The worst case at KL ``budget`` along a record's frontier: linear between the evaluations
    on either side of it (sorted by KL), the nearest end's value outside them."""
    if not points:
        return math.nan
    kl, worst = zip(*sorted(points), strict=True)
    return float(np.interp(budget, kl, worst))


def config_labels(frame: pd.DataFrame) -> pd.Series:
    """``method`` when a method has one config in view, else ``method (radius, size, scale)``."""
    configs = frame.groupby("method").config_hash.nunique()
    out = []
    for row in frame.itertuples():
        if configs.get(row.method, 1) == 1:
            out.append(row.method)
        else:
            parts = [p for p in (row.radius, f"size {row.size}", f"n {row.scale}") if not p.endswith("-")]
            out.append(f"{row.method} ({', '.join(parts)})")
    return pd.Series(out, index=frame.index)


def has_prompt_values(done: pd.DataFrame) -> bool:
    return bool(len(done)) and all(isinstance(v, list) for v in done.prompt_values)


def prompt_scores(done: pd.DataFrame) -> pd.DataFrame:
    """``method`` (the config hash), ``seed``, ``prompt``, ``value`` of completed records: per test
    prompt where every record has per-prompt values, else each seed's worst case as its one value."""
    per_prompt = has_prompt_values(done)
    once = done.drop_duplicates(["config_hash", "seed"])  # a cell's copies (e.g. a tuning trial) agree
    rows = [
        (r.config_hash, r.seed, i, float(v))
        for r in once.itertuples()
        for i, v in enumerate(r.prompt_values if per_prompt else [r.worst_case])
    ]
    return pd.DataFrame(rows, columns=["method", "seed", "prompt", "value"])


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
    return float(scipy_stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """Completed records aggregated over seeds per config; ranked by the mean of the ranking metric
    (``ranked_by``), with a rank interval and each robust row's paired comparison with its base."""
    done = frame[frame.status == "completed"]
    if done.empty:
        return pd.DataFrame()
    # A common KL budget per task: the smallest final KL of any config, which every config passed on
    # its way; each record is then read at that KL along its frontier (equal regularization).
    budget = done.groupby(["task", "config_hash"]).kl_ref.mean().groupby("task").min()
    done = done.assign(kl_budget=done.task.map(budget))
    done = done.assign(
        kl_matched=[kl_matched(p, b) for p, b in zip(done.frontier, done.kl_budget, strict=True)]
    )
    keys = ["task", "method", "config_hash", "context_hash", "radius", "radius_value", "strength", "tuned"]
    keys += ["tuning_budget"]
    keys += ["size", "scale"]
    caps = [c for c in done.columns if c.startswith("cap:")]
    grouped = done.groupby(keys, dropna=False)
    agg = grouped.agg(
        worst_case=("worst_case", "mean"),
        worst_case_std=("worst_case", "std"),
        worst_case_ci=("worst_case", t_halfwidth),
        worst_case_selected=("worst_case_selected", "mean"),
        worst_case_selected_ci=("worst_case_selected", t_halfwidth),
        seeds=("seed", "nunique"),
        mean_over_test=("mean_over_test", "mean"),
        train_reward=("train_reward", "mean"),
        kl_ref=("kl_ref", "mean"),
        kl_matched=("kl_matched", "mean"),
        kl_budget=("kl_budget", "first"),
        **{c: (c, "mean") for c in caps},
    ).reset_index()
    agg["worst_case_std"] = agg["worst_case_std"].fillna(0.0)
    parts = [_ranked(agg[agg.task == task], done[done.task == task]) for task in sorted(agg.task.unique())]
    return pd.concat(parts, ignore_index=True)


def _ranked(board: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """One task's rows sorted by its ranking metric, with the rank interval and the paired columns."""
    metric = "worst_case_selected" if has_prompt_values(done) else "worst_case"
    board = board.sort_values(metric, ascending=False, kind="stable").reset_index(drop=True)
    board.insert(0, "ranked_by", metric)
    board.insert(0, "rank", [str(i) for i in range(1, len(board) + 1)])
    scores = prompt_scores(done)
    if scores.seed.nunique() >= 2 and len(board) > 1:
        intervals = stats.rank_intervals(scores)
        board["rank"] = [intervals.loc[h, "rank_text"] for h in board.config_hash]
    return board.join(paired_with_base(board, scores))


def paired_with_base(board: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Per row: the paired difference from its non-robust base (same task and training context)
    over shared seeds and prompts, its 95% interval, the Holm-corrected p-value over the task's
    comparisons and a mark (▲ better, ▼ worse, at 5%). A tuned row is compared with a base tuned on
    the same budget where there is one. Rows without a base, or sharing fewer than two seeds with
    it, get NaN and no mark."""
    found = {}
    for i, row in board.iterrows():
        method = methods.get(row.method) if row.method in methods.METHODS else None
        base = board[
            (board.method == getattr(method, "base", None)) & (board.context_hash == row.context_hash)
        ]
        if method is None or method.knob is None or base.empty:
            continue
        if (base.tuning_budget == row.tuning_budget).any():
            base = base[base.tuning_budget == row.tuning_budget]
        pair = scores[scores.method.isin([row.config_hash, base.config_hash.iloc[0]])]
        shared = pair.groupby("seed").method.nunique()
        if (shared == 2).sum() < 2:
            continue
        found[i] = stats.paired_comparison(pair, row.config_hash, base.config_hash.iloc[0], alpha=ALPHA)
    adjusted = stats.holm({str(i): c.p_value for i, c in found.items()}) if found else {}
    out = pd.DataFrame(
        index=board.index, columns=["vs_base", "vs_base_low", "vs_base_high", "p_holm", "mark"]
    )
    out[["vs_base", "vs_base_low", "vs_base_high", "p_holm"]] = math.nan
    out["mark"] = ""
    for i, c in found.items():
        p = adjusted[str(i)]
        out.loc[i, ["vs_base", "vs_base_low", "vs_base_high", "p_holm"]] = [
            c.estimate,
            c.ci_low,
            c.ci_high,
            p,
        ]
        out.loc[i, "mark"] = stats.mark_of(c.estimate, p < ALPHA)
    return out.astype({"vs_base": float, "vs_base_low": float, "vs_base_high": float, "p_holm": float})


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.status != "completed"][["task", "method", "config_hash", "seed", "status", "error"]]


def vs_base_text(row) -> str:
    """``+0.0123 [+0.0040, +0.0206] ▲`` (or ``-`` without a comparison)."""
    if pd.isna(row.vs_base):
        return "-"
    return f"{row.vs_base:+.4f} [{row.vs_base_low:+.4f}, {row.vs_base_high:+.4f}] {row.mark}".rstrip()


def format_leaderboard(board: pd.DataFrame) -> str:
    """The terminal leaderboard (Markdown): rank intervals, the ranking metric with its 95%
    t-interval over seeds, the plain minimum beside it, and the paired comparison with the base."""
    if board.empty:
        return "(no completed runs)"
    selected = board.ranked_by.eq("worst_case_selected").all()
    ranked = "worst_case_selected" if selected else "worst_case"
    ci = board[f"{ranked}_ci"].fillna(0.0)
    shown = board.assign(
        ranked=[f"{m:.4f} ± {c:.4f}" for m, c in zip(board[ranked], ci, strict=True)],
        vs=[vs_base_text(r) for r in board.itertuples()],
        p=[("" if pd.isna(v) else f"{v:.3g}") for v in board.p_holm],
    )
    columns = ["rank", "task", "method", "config_hash", "radius"]
    columns += [c for c in ("strength", "tuned") if board[c].ne("-").any()]
    columns += ["size", "scale", "ranked"]
    columns += ["worst_case"] if selected else []
    columns += ["vs", "p", "seeds", "mean_over_test", "train_reward", "kl_ref", "kl_matched"]
    shown = shown[columns]
    names = {
        "ranked": "worst case, val-selected (± 95% CI)" if selected else "worst-case (± 95% CI)",
        "worst_case": "min over mixtures",
        "vs": "vs base [95% CI]",
        "p": "p (Holm)",
        "mean_over_test": "mean test",
        "train_reward": "train mix",
        "kl_ref": "KL(ref)",
        "config_hash": "config",
        "kl_matched": f"worst @ KL {board.kl_budget.iloc[0]:.3g}",
    }
    if all(_is_reward_model_task(t) for t in board.task):  # accuracies, not rewards
        names |= {
            "ranked": f"worst OOD acc{', val-selected' if selected else ''} (± 95% CI)",
            "worst_case": "min OOD acc",
            "mean_over_test": "mean OOD acc",
            "train_reward": "ID acc",
        }
        shown = shown.drop(columns=["kl_ref", "kl_matched"])
    return shown.rename(columns=names).to_markdown(index=False, floatfmt=".4f")


def _is_reward_model_task(name: str) -> bool:
    try:
        return tasks.get(name).trainer == "rm"
    except LookupError:
        return False
