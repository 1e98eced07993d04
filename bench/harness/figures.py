"""Figures of ``bench report`` (seaborn; PNG and PDF), each a pure function of run records.

* ``preference_shift``: reward against the mixture weight alpha of the seen objective pair, one
  line per method config (the paper's preference-shift curve; band: 95% CI over seeds);
* ``worst_vs_<axis>``: worst-case reward against the radius, the model size or the data scale,
  for whichever axes the records span, one line per method (and per context when several);
* ``learning_curves``: worst-case test reward against the iteration;
* ``effective_sample_size``: the robust weights' ESS / batch against the iteration, per method;
* ``kl_frontier``: worst case against KL to the reference at every evaluation (equal regularization);
* ``pairwise``: every pair's paired difference (row minus column) as a heatmap in rank order, with
  ``*`` where the Holm-adjusted p-value is below 0.05;
* ``radius_coverage``: the coverage study's mean parameter error against n, log-log, with the
  fitted slopes in the legend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from bench.harness.leaderboard import config_labels

sns.set_theme(style="whitegrid", context="paper")


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _save(fig, folder: Path, name: str) -> list[Path]:
    fig.tight_layout()
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def preference_shift(records: list[dict], frame: pd.DataFrame, folder: Path) -> list[Path]:
    labels = dict(zip(frame.path, config_labels(frame), strict=True))
    rows, pair = [], None
    for rec in records:
        metrics = rec.get("metrics") or {}
        pair = pair or metrics.get("seen_pair")
        for m in (metrics.get("mixtures") or {}).values():
            if "pair_alpha" in m:
                rows.append(
                    {
                        "config": labels[rec["path"]],
                        "seed": rec["seed"],
                        "alpha": m["pair_alpha"],
                        "reward": m["reward"],
                    }
                )
    if not rows:
        return []
    data = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    sns.lineplot(data=data, x="alpha", y="reward", hue="config", marker="o", errorbar=("ci", 95), ax=ax)
    a, b = pair or ("first seen objective", "second")
    ax.set(
        xlabel=f"alpha  (reward = alpha·{a} + (1 - alpha)·{b})",
        ylabel="mean test reward",
        title="preference shift: reward against the mixture weight",
    )
    _legend_outside(ax)
    return _save(fig, folder, "preference_shift")


def versus(frame: pd.DataFrame, folder: Path, axis: str) -> list[Path]:
    """Worst-case reward against ``axis`` (radius_value, size or scale) if the records span it."""
    done = frame[frame.status == "completed"].copy()
    if axis == "radius_value":
        done = done[done.radius_value.notna()]
    spans = done.groupby("method")[axis].nunique()
    done = done[done.method.isin(spans[spans >= 2].index)]  # only methods seen at two or more values
    if done.empty:
        return []
    others = [c for c in ("size", "scale") if c != axis and done[c].nunique() > 1]
    if axis != "radius_value" and done.radius_value.dropna().nunique() > 1:
        others.append("radius")
    done["context"] = done[others].astype(str).agg(", ".join, axis=1) if others else "all"
    if axis in ("radius_value", "scale"):
        done[axis] = pd.to_numeric(done[axis])
    fig, ax = plt.subplots(figsize=(7.4, 4.2))
    sns.lineplot(
        data=done,
        x=axis,
        y="worst_case",
        hue="method",
        style="context" if others else None,
        marker="o",
        errorbar=("ci", 95),
        ax=ax,
    )
    if axis in ("radius_value", "scale"):
        ax.set_xscale("log")
    name = {
        "radius_value": "radius (each method's own knob)",
        "size": "model size",
        "scale": "data scale (n)",
    }[axis]
    ax.set(xlabel=name, ylabel="worst-case test reward", title=f"worst-case reward against {name}")
    _legend_outside(ax)
    return _save(fig, folder, f"worst_vs_{axis.removesuffix('_value')}")


def learning_curves(records: list[dict], frame: pd.DataFrame, folder: Path) -> list[Path]:
    labels = dict(zip(frame.path, config_labels(frame), strict=True))
    rows = [
        {
            "config": labels[rec["path"]],
            "seed": rec["seed"],
            "iteration": c["iteration"],
            "worst_case": c["worst_case"],
        }
        for rec in records
        if rec.get("status") == "completed"
        for c in rec.get("curves", [])
    ]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sns.lineplot(
        data=pd.DataFrame(rows), x="iteration", y="worst_case", hue="config", errorbar=("ci", 95), ax=ax
    )
    ax.set(xlabel="iteration", ylabel="worst-case test reward", title="learning curves")
    _legend_outside(ax)
    return _save(fig, folder, "learning_curves")


def effective_sample_size(records: list[dict], frame: pd.DataFrame, folder: Path) -> list[Path]:
    """The robust weights' effective sample size as a share of the batch (``ess / N``, 1 for
    uniform weights) against the iteration, one line per method (band: 95% CI over seeds and
    configs): how hard each ambiguity set leans on few pairs as training goes."""
    rows = [
        {"method": rec["method"], "iteration": s["iteration"], "ess_frac": s["ess_frac"]}
        for rec in records
        if rec.get("status") == "completed"
        for s in rec.get("steps") or []
        if "ess_frac" in s
    ]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    data = pd.DataFrame(rows)
    sns.lineplot(
        data=data, x="iteration", y="ess_frac", hue="method", style="method", errorbar=("ci", 95), ax=ax
    )
    ax.set(
        xlabel="iteration",
        ylabel="effective sample size / batch",
        ylim=(0, 1.05),
        title="effective sample size of the robust weights",
    )
    _legend_outside(ax)
    return _save(fig, folder, "effective_sample_size")


def frontier(frame: pd.DataFrame, folder: Path) -> list[Path]:
    """Worst case against KL to the reference, one point per evaluation of every record, one line
    per method (through its radii and evaluations): robustness at equal regularization."""
    labels = config_labels(frame)
    rows = [
        {"config": labels[i], "method": row.method, "kl_ref": kl, "worst_case": worst}
        for i, row in frame.iterrows()
        for kl, worst in row.frontier
    ]
    if not rows:
        return []
    data = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sns.scatterplot(data=data, x="kl_ref", y="worst_case", hue="method", style="method", s=18, ax=ax)
    ax.set(xlabel="KL(policy || reference) per token", ylabel="worst-case test reward", title="KL frontier")
    _legend_outside(ax)
    return _save(fig, folder, "kl_frontier")


def pairwise_heatmap(pairs: pd.DataFrame, folder: Path) -> list[Path]:
    """``pairs`` (long form: method, versus, estimate, p_holm; ``report.pairwise``) as a heatmap."""
    if pairs.empty:
        return []
    order = list(dict.fromkeys(pairs.method))
    estimate = pairs.pivot(index="method", columns="versus", values="estimate").reindex(order, columns=order)
    p_holm = pairs.pivot(index="method", columns="versus", values="p_holm").reindex(order, columns=order)
    text = estimate.map(lambda v: "" if pd.isna(v) else f"{v:+.3f}") + p_holm.map(
        lambda p: "*" if p < 0.05 else ""
    )
    size = 1.2 + 0.55 * len(order)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    sns.heatmap(estimate, annot=text, fmt="", cmap="RdBu", center=0, annot_kws={"fontsize": 6}, ax=ax)
    ax.set(xlabel="versus", ylabel="method", title="paired difference, row - column (* Holm p < 0.05)")
    return _save(fig, folder, "pairwise")


def task_figures(records: list[dict], frame: pd.DataFrame, folder: Path) -> list[Path]:
    done = [r for r in records if r.get("status") == "completed"]
    frame = frame[frame.status == "completed"]
    paths = preference_shift(done, frame, folder)
    for axis in ("radius_value", "size", "scale"):
        paths += versus(frame, folder, axis)
    paths += learning_curves(done, frame, folder) + effective_sample_size(done, frame, folder)
    return paths + frontier(frame, folder)


def coverage_figure(root: Path, out: Path) -> list[Path]:
    """One log-log figure per radius-coverage study found under ``root/radius-coverage``."""
    paths = []
    for study in sorted((Path(root) / "radius-coverage").glob("*/trials.csv")):
        trials = pd.read_csv(study)
        slopes = pd.read_csv(study.with_name("slopes.csv"))
        means = trials.groupby(["divergence", "a", "n"], dropna=False).param_error.mean().reset_index()
        slope_of = {(r.divergence, r.a): r.slope for r in slopes.itertuples()}
        names = sorted(means.divergence.unique(), key=lambda d: (d != "erm", d))
        fig, axes = plt.subplots(
            1, len(names) - 1 or 1, figsize=(5.2 * max(1, len(names) - 1), 4.0), squeeze=False
        )
        erm = means[means.divergence == "erm"]
        for ax, name in zip(axes[0], [n for n in names if n != "erm"] or ["erm"], strict=False):
            for a, grp in means[means.divergence == name].groupby("a"):
                ax.plot(
                    grp.n,
                    grp.param_error,
                    marker="o",
                    label=f"eps ∝ n^-{a:g}: slope {slope_of[(name, a)]:+.2f}",
                )
            if not erm.empty:
                slope = next(v for (d, _), v in slope_of.items() if d == "erm")
                ax.plot(erm.n, erm.param_error, "k--", label=f"ERM: slope {slope:+.2f}")
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="n",
                ylabel="mean ||theta_n - theta*||",
                title=f"radius coverage: {name} ball",
            )
            ax.legend(fontsize=7)
        folder = Path(out) / "radius-coverage"
        folder.mkdir(parents=True, exist_ok=True)
        paths += _save(fig, folder, f"radius_coverage_{study.parent.name}")
    return paths
