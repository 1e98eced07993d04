"""Robust reward models (DRO-RLHF's reward-based half) and reward-based policy optimization."""

import pytest
import torch

from bench.cli import main
from bench.harness.records import read_json
from bench.harness.runner import Cell, record_path, run_cell
from tasks.prefs import PairSet, _unified_pairs

pytestmark = pytest.mark.slow
PREFS = (
    "task.pretrain_steps=60",
    "task.n=48",
    "task.n_val=16",
    "task.n_test=24",
    "task.max_new_tokens=8",
    "train.iterations=6",
    "train.batch_size=16",
    "train.eval_every=3",
)


def test_reward_model_accuracies_by_hand(tmp_path):
    from bench.loops.reward_model import accuracy
    from tasks.lexicon.presets import ensure_preset
    from tasks.reward_model import load_reward_model

    model, tok = load_reward_model(str(ensure_preset("tiny", 60)))
    model.eval()
    pairs = PairSet(
        ["a happy day", "sad rain", "joy"],
        ["sad rain", "a happy day", "grief"],
        torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
    )
    from tasks.reward_model import rm_scores

    with torch.no_grad():
        a = rm_scores(model, tok, pairs.first)[0]
        b = rm_scores(model, tok, pairs.second)[0]
        # left padding: a text's score does not depend on its batch mates
        alone = torch.stack([rm_scores(model, tok, [t])[0][0] for t in pairs.first])
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-5)
    expected = sum(int((x > y) == (lab >= 0.5)) for x, y, lab in zip(a, b, pairs.label, strict=True)) / 3
    assert accuracy(model, tok, pairs) == pytest.approx(expected)


def test_bt_family_trains_and_prints_an_id_ood_leaderboard(tmp_path, capsys):
    args = [
        "run",
        "--task",
        "lexicon-prefs",
        "--methods",
        "bt,kl-bt,chi2-bt,tv-bt,w-bt",
        "--cluster",
        "debug",
        "--results",
        str(tmp_path),
        "--quiet",
        *PREFS,
        "train.save_model=true",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("chi2-bt", "tv-bt", "w-bt"))
    rec = read_json(
        record_path(Cell("lexicon-prefs", "chi2-bt", 0, (*PREFS, "train.save_model=true")), tmp_path)
    )
    acc = rec["metrics"]["accuracy"]
    assert set(acc) == {"id", "ood:sadness", "ood:anger", "ood:fear", "ood:vader"}
    assert rec["metrics"]["worst_case"] == min(v for k, v in acc.items() if k != "id")
    assert rec["metrics"]["train_reward"] == acc["id"]
    assert all(0 <= v <= 1 for v in acc.values())


def test_robust_rm_and_plain_rm_feed_rebel_cells_of_one_sweep(tmp_path):
    rms = {}
    for method in ("bt", "chi2-bt"):
        cell = Cell("lexicon-prefs", method, 0, (*PREFS, "train.save_model=true"))
        run_cell(cell, tmp_path / "rm")
        rms[method] = cell.run_dir(tmp_path / "rm") / "policy"
    sweep = tmp_path / "rlhf.yaml"
    sweep.write_text(
        "task: lexicon\nmethods: [rebel, chi2-rebel]\nseeds: [0]\n"
        f"grid: {{task.reward_model: ['{rms['bt']}', '{rms['chi2-bt']}']}}\n"
        "overrides: [task.pretrain_steps=60, task.n=24, task.n_val=8, task.n_test=12, task.max_new_tokens=8, "
        "train.iterations=3, train.batch_size=6, train.eval_every=3]\n"
    )
    assert (
        main(
            [
                "run",
                "--sweep",
                str(sweep),
                "--cluster",
                "debug",
                "--results",
                str(tmp_path / "pol"),
                "--quiet",
            ]
        )
        == 0
    )
    recs = [read_json(p) for p in (tmp_path / "pol" / "lexicon").rglob("record.json")]
    assert len(recs) == 4 and all(r["status"] == "completed" for r in recs)
    assert {r["config"]["task"]["reward_model"] for r in recs} == {str(rms["bt"]), str(rms["chi2-bt"])}
    assert all("learned_rm" in r["metrics"]["objectives"] for r in recs)
    assert all(
        not any(w[-1] for w in (m["weights"] for m in r["metrics"]["mixtures"].values())) for r in recs
    ), "evaluation mixtures never use the learned reward"


def test_unified_feedback_pairs_and_offline_failure(monkeypatch):
    rows = [
        {
            "conv_A": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "conv_B": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
            "conv_A_rating": 5,
            "conv_B_rating": 1,
        },
        {
            "conv_A": [{"role": "user", "content": "x"}],
            "conv_B": [{"role": "user", "content": "y"}],
            "conv_A_rating": 2,
            "conv_B_rating": 2,
        },
    ]
    pairs = _unified_pairs(rows)
    assert len(pairs.first) == 1 and pairs.label.tolist() == [1.0]  # ties dropped
    assert pairs.first[0] == "\n\nUser: hi\n\nAssistant: hello"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        main(
            [
                "run",
                "--task",
                "unified-feedback",
                "--methods",
                "bt",
                "--cluster",
                "debug",
                "--quiet",
                "--results",
                "/tmp/bench-uf-offline",
            ]
        )
        == 1
    )
    rec = next(iter(__import__("pathlib").Path("/tmp/bench-uf-offline").rglob("record.json")))
    assert "llm-blender/Unified-Feedback" in read_json(rec)["error"]["message"]
