"""bench report: per-task leaderboards (Markdown, LaTeX booktabs, CSV, HTML) and figures.

A pure function of the run records: nothing is recomputed. Each config of a method is its own row
(seeds aggregated: mean and 95% t-interval); the best value of each column is in bold (highest
reward, lowest KL); the rank is a bootstrap interval; each robust method is compared with its
non-robust base (REBEL, DPO or IPO) run with the same task and training config on the same seeds,
prompt by prompt (``bench.harness.leaderboard``): the mean paired difference with its
cluster-robust 95% interval, ▲/▼ where it is significant after Holm's correction. Below each
table: the split-half rank agreement and the seeds needed to separate the top rows. Failed and
incomplete cells are listed apart and never ranked.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.harness import stats
from bench.harness.leaderboard import (
    config_labels,
    failures,
    leaderboard,
    load_records,
    prompt_scores,
    records_frame,
    vs_base_text,
)

README_START, README_END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"
# (column, header, which value is best)
COLUMNS = [
    ("ranked", "worst-case", "max"),
    ("ranked_ci", "± 95% CI", None),
    ("worst_case", "min over mixtures", "max"),
    ("mean_over_test", "mean test", "max"),
    ("train_reward", "train mix", "max"),
    ("kl_ref", "KL(ref)", "min"),
    ("kl_matched", "worst @ common KL", "max"),
]


def table(board: pd.DataFrame) -> pd.DataFrame:
    """The numeric paper table of one task's leaderboard (rank order), with the paired comparison
    columns. The ranked column is the validation-selected worst case where the records have
    per-prompt scores (then the plain minimum sits beside it), else the minimum."""
    if board.empty:
        return board
    board = board.copy()
    ranked = board.ranked_by.iloc[0]
    board["ranked"], board["ranked_ci"] = board[ranked], board[f"{ranked}_ci"]
    board["vs_base"] = [vs_base_text(r) for r in board.itertuples()]
    board["p_holm"] = ["" if pd.isna(v) else f"{v:.3g}" for v in board.p_holm]
    caps = [c for c in board.columns if c.startswith("cap:") and board[c].notna().any()]
    minimum = ["worst_case"] if ranked != "worst_case" else []
    shown = [c for c in ("strength", "tuned") if board[c].ne("-").any()]
    cols = ["rank", "method", "radius", *shown, "size", "scale", "seeds", "ranked", "ranked_ci"]
    cols += minimum
    rest = ["mean_over_test", "train_reward", "kl_ref", "kl_matched", "vs_base", "p_holm"]
    return board[[*cols, *rest, *caps]]


def pairwise(frame: pd.DataFrame, task: str, board: pd.DataFrame) -> pd.DataFrame:
    """Every pair of the task's configs in rank order, by ``stats.pairwise_matrix`` (row minus
    column, paired over seeds and prompts, Holm over all pairs), in long form: method, versus,
    estimate, p_holm. Only configs run on the most common set of seeds (at least two) take part,
    so that every pair shares its seeds. Empty when fewer than two configs do."""
    done = frame[(frame.task == task) & (frame.status == "completed")]
    seed_sets = done.groupby("config_hash").seed.agg(lambda s: tuple(sorted(set(s))))
    common = seed_sets[seed_sets.map(len) >= 2].value_counts()
    if common.empty:
        return pd.DataFrame(columns=["method", "versus", "estimate", "p_holm"])
    order = [h for h in board.config_hash if seed_sets.get(h) == common.index[0]]
    if len(order) < 2:
        return pd.DataFrame(columns=["method", "versus", "estimate", "p_holm"])
    matrix = stats.pairwise_matrix(prompt_scores(done[done.config_hash.isin(order)]), order)
    names = dict(zip(board.config_hash, config_labels(board), strict=True))
    long = matrix.estimate.stack().rename("estimate").to_frame().join(matrix.p_holm.stack().rename("p_holm"))
    long = long.reset_index()
    long = long[long.method != long.versus]
    return long.assign(method=long.method.map(names), versus=long.versus.map(names)).reset_index(drop=True)


def stability(frame: pd.DataFrame, task: str, board: pd.DataFrame, top: int = 3) -> str:
    """Split-half rank agreement over seeds, and the seeds needed at 80% power to separate each
    adjacent pair of the top rows of ``board`` (from their per-seed paired differences)."""
    done = frame[(frame.task == task) & (frame.status == "completed")]
    scores = prompt_scores(done)
    if scores.seed.nunique() < 2 or scores.method.nunique() < 2:
        return ""
    parts = [
        f"worst @ common KL: each config's worst case at KL(ref) = {board.kl_budget.iloc[0]:.4g} (the "
        "smallest final KL of any config), interpolated between its evaluations",
        "split-half rank agreement (Kendall's tau over halves of the seeds): "
        f"{stats.split_half_tau(scores):.2f}",
    ]
    rows = board.head(top)
    for a, b in zip(rows.itertuples(), rows.iloc[1:].itertuples(), strict=False):
        try:
            n = stats.seeds_for_power(scores, a.config_hash, b.config_hash)
        except ValueError:
            continue
        shown = "more than 10^4" if not math.isfinite(n) or n > 1e4 else f"{math.ceil(n)}"
        parts.append(f"seeds to separate {a.method} from {b.method} at 80% power: {shown}")
    return "; ".join(parts) + "."


def _cells(tab: pd.DataFrame) -> list[list[tuple[str, bool]]]:
    """Formatted cells with a flag marking the best value of each scored column."""
    best = {}
    for col, _, which in COLUMNS + [(c, c, "max") for c in tab.columns if c.startswith("cap:")]:
        if which and col in tab and tab[col].notna().any():
            best[col] = tab[col].max() if which == "max" else tab[col].min()
    rows = []
    for _, r in tab.iterrows():
        cells = []
        for col in tab.columns:
            v = r[col]
            if isinstance(v, float):
                text = "" if math.isnan(v) else (f"± {v:.4f}" if col == "ranked_ci" else f"{v:.4f}")
                cells.append((text, col in best and not math.isnan(v) and v == best[col]))
            else:
                cells.append((str(v), False))
        rows.append(cells)
    return rows


def headers(tab: pd.DataFrame) -> list[str]:
    names = {c: h for c, h, _ in COLUMNS} | {"vs_base": "Δ vs base [95% CI]", "p_holm": "p (Holm)"}
    return [names.get(c, c.removeprefix("cap:")) for c in tab.columns]


def _numeric(tab: pd.DataFrame) -> list[bool]:
    return [tab[c].dtype.kind in "if" for c in tab.columns]


def to_markdown(tab: pd.DataFrame) -> str:
    align = ["---:" if num else ":---" for num in _numeric(tab)]
    lines = ["| " + " | ".join(headers(tab)) + " |", "|" + "|".join(align) + "|"]
    for row in _cells(tab):
        lines.append("| " + " | ".join(f"**{t}**" if b else t for t, b in row) + " |")
    return "\n".join(lines)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def to_latex(tab: pd.DataFrame, caption: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``)."""
    spec = "".join("r" if num else "l" for num in _numeric(tab))
    body = [
        " & ".join(f"\\textbf{{{_tex(t)}}}" if b else _tex(t) for t, b in row) + r" \\" for row in _cells(tab)
    ]
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_tex(caption)}}}",
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(_tex(h) for h in headers(tab)) + r" \\",
            r"\midrule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def to_html(tab: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers(tab))
    body = "".join(
        "<tr>"
        + "".join(f"<td><b>{html.escape(t)}</b></td>" if b else f"<td>{html.escape(t)}</td>" for t, b in row)
        + "</tr>\n"
        for row in _cells(tab)
    )
    return (
        f"<table>\n<caption>{html.escape(caption)}</caption>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>\n{body}</tbody>\n</table>\n"
    )


@dataclass
class TaskReport:
    task: str
    table: pd.DataFrame
    markdown: str
    files: list[Path]
    failed: pd.DataFrame


def write_reports(
    root: Path, out: Path, task: str | None = None, sweep: str | None = None, figures: bool = True
) -> list[TaskReport]:
    """Every task's tables (and figures) under ``out/<task>/``."""
    from bench.harness.figures import coverage_figure, pairwise_heatmap, task_figures

    records = load_records(root, task, sweep)
    frame = records_frame(records)
    reports = []
    for name in sorted(frame.task.dropna().unique()):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        board = leaderboard(frame[frame.task == name])
        tab = table(board)
        caption = f"{name}: worst-case reward over held-out test mixtures (mean over seeds, 95% t-interval)"
        files = []
        md = to_markdown(tab) if not tab.empty else "(no completed runs)"
        note = stability(frame, name, board) if not tab.empty else ""
        md = f"{md}\n\n{note}" if note else md
        for fname, text in (
            ("leaderboard.md", md + "\n"),
            ("leaderboard.tex", to_latex(tab, caption)),
            ("leaderboard.html", to_html(tab, caption)),
        ):
            if not tab.empty:
                (folder / fname).write_text(text)
                files.append(folder / fname)
        if not tab.empty:
            tab.to_csv(folder / "leaderboard.csv", index=False)
            files.append(folder / "leaderboard.csv")
        failed = failures(frame[frame.task == name])
        if not failed.empty:
            (folder / "failures.md").write_text(failed.to_markdown(index=False) + "\n")
            files.append(folder / "failures.md")
        pairs = pairwise(frame, name, board) if not tab.empty else pd.DataFrame()
        if not pairs.empty:
            pairs.to_csv(folder / "pairwise.csv", index=False)
            files.append(folder / "pairwise.csv")
        if figures:
            files += task_figures(
                [r for r in records if r.get("task") == name], frame[frame.task == name], folder
            )
            files += pairwise_heatmap(pairs, folder)
        reports.append(TaskReport(name, tab, md, files, failed))
    if figures and task in (None, "linear"):
        files = coverage_figure(Path(root), Path(out))
        if files:
            reports.append(TaskReport("radius-coverage", pd.DataFrame(), "", files, pd.DataFrame()))
    return reports


def refresh_readme(readme: Path, reports: list[TaskReport]) -> None:
    """Replace the marked results section of the README with the generated tables."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} section to refresh")
    body = "\n\n".join(f"**{r.task}**\n\n{r.markdown}" for r in reports if r.markdown)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{body}\n{README_END}{tail}")
