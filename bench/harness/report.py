"""bench report: per-task leaderboards (Markdown, LaTeX booktabs, CSV, HTML) and figures.

A pure function of the run records: nothing is recomputed. Each config of a method is its own row
(seeds aggregated: mean and 95% t-interval); the best value of each column is in bold (highest
reward, lowest KL); each robust method is compared with its non-robust base (REBEL, DPO or IPO)
run with the same task and training config on the same seeds: the mean paired difference of the
worst-case reward and a paired t-test marker (* p < 0.05, ** p < 0.01). Failed and incomplete
cells are listed apart and never ranked.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy import stats

import methods
from bench.harness.leaderboard import failures, leaderboard, load_records, records_frame

README_START, README_END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"
# (column, header, which value is best)
COLUMNS = [
    ("worst_case", "worst-case", "max"),
    ("worst_case_ci", "± 95% CI", None),
    ("mean_over_test", "mean test", "max"),
    ("train_reward", "train mix", "max"),
    ("kl_ref", "KL(ref)", "min"),
]


def paired_vs_base(frame: pd.DataFrame, board: pd.DataFrame) -> list[str]:
    """Per leaderboard row: ``+0.0123**`` against the base method on shared seeds, or ``-``."""
    done = frame[frame.status == "completed"]
    out = []
    for row in board.itertuples():
        method = methods.get(row.method) if row.method in methods.METHODS else None
        if method is None or method.knob is None:
            out.append("-")
            continue
        mine = done[(done.config_hash == row.config_hash) & (done.method == row.method)].set_index("seed")
        base = done[(done.method == method.base) & (done.context_hash == row.context_hash)]
        base = base[base.task == row.task].set_index("seed")
        seeds = sorted(set(mine.index) & set(base.index))
        if not seeds:
            out.append("-")
            continue
        diff = mine.loc[seeds, "worst_case"].to_numpy() - base.loc[seeds, "worst_case"].to_numpy()
        out.append(f"{diff.mean():+.4f}{significance(diff)}")
    return out


def significance(diff) -> str:
    """Paired t-test marker for differences over seeds (``(n=1)`` with a single shared seed)."""
    if len(diff) < 2:
        return " (n=1)"
    degenerate = diff.std(ddof=1) == 0  # identical differences: the test is exact
    p = (0.0 if diff.mean() != 0 else 1.0) if degenerate else stats.ttest_1samp(diff, 0.0).pvalue
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


def table(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """The numeric paper table of one task (rank order), with the paired comparison column."""
    board = leaderboard(frame[frame.task == task])
    if board.empty:
        return board
    board["vs_base"] = paired_vs_base(frame, board)
    caps = [c for c in board.columns if c.startswith("cap:") and board[c].notna().any()]
    cols = [
        "rank",
        "method",
        "radius",
        "size",
        "scale",
        "seeds",
        *[c for c, _, _ in COLUMNS],
        "vs_base",
        *caps,
    ]
    return board[cols]


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
                text = "" if math.isnan(v) else (f"± {v:.4f}" if col == "worst_case_ci" else f"{v:.4f}")
                cells.append((text, col in best and not math.isnan(v) and v == best[col]))
            else:
                cells.append((str(v), False))
        rows.append(cells)
    return rows


def headers(tab: pd.DataFrame) -> list[str]:
    names = {c: h for c, h, _ in COLUMNS} | {"vs_base": "Δ worst vs base"}
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
    from bench.harness.figures import coverage_figure, task_figures

    records = load_records(root, task, sweep)
    frame = records_frame(records)
    reports = []
    for name in sorted(frame.task.dropna().unique()):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        tab = table(frame, name)
        caption = f"{name}: worst-case reward over held-out test mixtures (mean over seeds, 95% t-interval)"
        files = []
        md = to_markdown(tab) if not tab.empty else "(no completed runs)"
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
        if figures:
            files += task_figures(
                [r for r in records if r.get("task") == name], frame[frame.task == name], folder
            )
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
