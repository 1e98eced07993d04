"""bench report on a fixed set of small records: every number of the table checked by hand."""

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.harness.leaderboard import leaderboard, load_records, records_frame
from bench.harness.records import write_json_atomic
from bench.harness.report import README_END, README_START, refresh_readme, write_reports

BASE_CONFIG = {"task": {"d": 8, "n": 512}, "train": {"iterations": 10}}
STRENGTH = {"rebel": {"eta": 1.0}, "chi2-rebel": {"eta": 1.0}, "kldpo": {"beta": 0.1}, "dpo": {"beta": 0.1}}


def record(
    root: Path,
    method: str,
    seed: int,
    worst: float,
    *,
    radius=None,
    status="completed",
    curve=True,
    tags=(),
    chash=None,
):
    config = {
        **BASE_CONFIG,
        "method": {"name": method, **STRENGTH[method], **({radius[0]: radius[1]} if radius else {})},
        "seed": seed,
    }
    chash = chash or f"{method}-{radius[1] if radius else 0}"
    rec = {
        "task": "linear",
        "method": method,
        "seed": seed,
        "status": status,
        "config": config,
        "config_hash": chash,
        "radius": {"name": radius[0], "value": radius[1]} if radius else None,
        "tags": list(tags),
    }
    if status == "completed":
        rec["metrics"] = {
            "worst_case": worst,
            "mean_over_test": worst + 0.1,
            "train_reward": worst + 0.2,
            "kl_ref": -worst / 10,
            "val_worst_case": worst,
            "seen_pair": ["obj0", "obj1"],
            "mixtures": {
                f"{a}·obj0 + {1 - a}·obj1": {"reward": worst + a, "pair_alpha": a} for a in (0.0, 0.5, 1.0)
            },
        }
        rec["curves"] = (
            [
                {"iteration": i, "worst_case": worst * (2 - i / 10), "kl_ref": -worst / 100 * i}
                for i in (0, 10)
            ]
            if curve
            else []
        )
        rec["steps"] = [
            {"iteration": i, "ess_frac": 1.0 if radius is None else 1 - i / 20} for i in range(1, 11)
        ]
    else:
        rec["error"] = {"type": "ValueError", "message": "losses contain NaN", "traceback": ""}
    write_json_atomic(root / "linear" / method / chash / f"seed-{seed}" / "record.json", rec)


@pytest.fixture
def results(tmp_path):
    for seed, w in enumerate([-0.30, -0.32, -0.31]):
        record(tmp_path, "rebel", seed, w)
    for seed, w in enumerate([-0.20, -0.21, -0.205]):
        record(tmp_path, "chi2-rebel", seed, w, radius=("rho", 0.1))
    record(tmp_path, "kldpo", 0, -0.5, radius=("tau", 0.1))
    record(tmp_path, "dpo", 0, 0.0, status="failed")
    return tmp_path


def test_golden_leaderboard_numbers(results):
    (report,) = write_reports(results, results / "out", figures=False)
    # rebel: mean -0.31, sd 0.01, t(2, .975) = 4.302653 -> CI ± 0.024841
    # chi2-rebel: mean -0.205, sd 0.005 -> ± 0.012421; paired diffs vs rebel 0.10, 0.11, 0.105 (records
    #   without per-prompt scores: one value per seed): mean +0.105, se 0.005 / sqrt 3 = 0.0028868,
    #   CI ± 4.302653 * se = ± 0.012421 -> [+0.0926, +0.1174]; t = 36.4 on 2 df -> p = 0.000755 (one
    #   comparison: Holm changes nothing) -> ▲
    # kldpo: one seed -> no CI, and no DPO record to pair with -> "-"
    # worst @ common KL: budget B = the smallest final KL, chi2-rebel's mean 0.0205; a curve runs
    #   linearly from (KL 0, 2w) to (KL k = -w/10, w), so at B <= k it reads 2w + 10 B = 2w + 0.205:
    #   rebel 2·(-0.31) + 0.205 = -0.415; chi2-rebel: seed 0 ends at k = 0.020 < B (its end, -0.20),
    #   the others -0.215 and -0.205 -> mean -0.2067; kldpo 2·(-0.5) + 0.205 = -0.795
    # stability: both halves of the seeds rank chi2-rebel first (tau 1); delta / sd = 21, so 2 seeds
    expected = "\n".join(
        [
            "| rank | method | radius | strength | size | scale | seeds | worst-case | ± 95% CI | mean test "
            "| train mix | KL(ref) | worst @ common KL | Δ vs base [95% CI] | p (Holm) |",
            "|:---|:---|:---|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|:---|:---|",
            "| 1 | chi2-rebel | rho=0.1 | eta=1 | 8 | 512 | 3 | **-0.2050** | ± 0.0124 | **-0.1050** "
            "| **-0.0050** | **0.0205** | **-0.2067** | +0.1050 [+0.0926, +0.1174] ▲ | 0.000755 |",
            "| 2 | rebel | - | eta=1 | 8 | 512 | 3 | -0.3100 | ± 0.0248 | -0.2100 | -0.1100 | 0.0310 "
            "| -0.4150 | - |  |",
            "| 3 | kldpo | tau=0.1 | beta=0.1 | 8 | 512 | 1 | -0.5000 |  | -0.4000 | -0.3000 | 0.0500 "
            "| -0.7950 | - |  |",
            "",
            "worst @ common KL: each config's worst case at KL(ref) = 0.0205 (the smallest final KL of "
            "any config), interpolated between its evaluations; split-half rank agreement (Kendall's "
            "tau over halves of the seeds): 1.00; seeds to separate "
            "chi2-rebel from rebel at 80% power: 2.",
        ]
    )
    assert report.markdown == expected
    folder = results / "out" / "linear"
    tex = (folder / "leaderboard.tex").read_text()
    assert all(
        s in tex for s in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{-0.2050}", r"$\pm$ 0.0124")
    )
    assert r"+0.1050 [+0.0926, +0.1174] ▲" in tex and "kldpo" in tex
    assert "<b>-0.2050</b>" in (folder / "leaderboard.html").read_text()
    csv = (folder / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("rank,method,radius") and csv[1].split(",")[1] == "chi2-rebel"
    failed = (folder / "failures.md").read_text()
    assert "dpo" in failed and "losses contain NaN" in failed
    # every pair of the configs run on seeds 0-2 (kldpo has one seed): the comparison above, both ways
    pairs = (folder / "pairwise.csv").read_text().splitlines()
    assert pairs[0] == "method,versus,estimate,p_holm" and len(pairs) == 3
    assert pairs[1].startswith("chi2-rebel,rebel,0.105") and pairs[2].startswith("rebel,chi2-rebel,-0.105")
    assert float(pairs[1].split(",")[3]) == pytest.approx(0.000755, abs=5e-7)


def test_a_tuned_method_is_compared_with_its_base_tuned_on_the_same_budget(tmp_path):
    tuned = ("tuned:s", "tuning-budget:8", "tuned-keys:tau,beta")
    base_tuned = ("tuned:b", "tuning-budget:8", "tuned-keys:beta")
    for seed, (k, d, u) in enumerate([(-0.30, -0.40, -0.10), (-0.32, -0.41, -0.12), (-0.31, -0.39, -0.11)]):
        record(tmp_path, "kldpo", seed, k, radius=("tau", 1.0), tags=tuned)
        record(tmp_path, "dpo", seed, d, tags=base_tuned, chash="dpo-tuned")
        record(tmp_path, "dpo", seed, u)
    board = leaderboard(records_frame(load_records(tmp_path)))
    row = board[board.method == "kldpo"].iloc[0]
    # paired with the tuned dpo: differences +0.10, +0.09, +0.08 (the untuned dpo would give -0.2)
    assert row.vs_base == pytest.approx(0.09) and row.tuned == "8 trials: tau, beta"
    assert sorted(board[board.method == "dpo"].tuned) == ["-", "8 trials: beta"]


def test_figures_are_written(results):
    (report,) = write_reports(results, results / "out")
    names = {p.name for p in report.files}
    assert {"preference_shift.png", "preference_shift.pdf", "learning_curves.png", "kl_frontier.png"} <= names
    assert {"pairwise.png", "effective_sample_size.png"} <= names
    for path in report.files:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_configs_of_one_method_stay_apart(results):
    for seed, w in enumerate([-0.9, -0.8, -0.85]):
        record(results, "chi2-rebel", seed, w, radius=("rho", 5.0))
    (report,) = write_reports(results, results / "out", figures=False)
    rows = report.table[report.table.method == "chi2-rebel"]
    assert sorted(rows.radius) == ["rho=0.1", "rho=5"] and list(rows.seeds) == [3, 3]


def test_readme_section_is_refreshed(results, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nafter\n")
    reports = write_reports(results, results / "out", figures=False)
    refresh_readme(readme, reports)
    text = readme.read_text()
    assert "old" not in text and "| 1 | chi2-rebel |" in text and text.endswith("after\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench-report:start"):
        refresh_readme(readme, reports)
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "o"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "1 failed or incomplete cells" in out and json.dumps("dpo")[1:-1] in out
