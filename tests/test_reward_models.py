"""Robust reward models (DRO-RLHF's reward-based half) and reward-based policy optimization."""

import pytest
import torch
from transformers import AutoTokenizer

from bench.cli import main
from bench.harness.records import read_json
from bench.harness.runner import Cell, record_path, run_cell
from bench.loops.reward_model import encode_pairs
from tasks.lexicon.presets import ensure_preset
from tasks.prefs import PairSet, _unified_pairs
from tasks.reward_model import encode

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


@pytest.fixture(scope="module")
def tok():
    """The tiny lexicon preset's byte-level BPE (built offline; no special tokens of its own)."""
    return AutoTokenizer.from_pretrained(ensure_preset("tiny", 60))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


PROMPT = "When I think about the old lighthouse, I remember the long summer storm. " * 8


def test_a_long_shared_prompt_loses_its_start_and_keeps_both_responses_whole(tok):
    responses = [" We laughed with joy.", " We wept in grief."]
    assert len(ids(tok, PROMPT)) > 32 > max(len(ids(tok, r)) for r in responses)
    pairs = PairSet([PROMPT], responses[:1], responses[1:], torch.ones(1, dtype=torch.float64))
    kept = encode_pairs(tok, pairs, 32, "test set")
    for seq, response in zip((kept.first[0], kept.second[0]), responses, strict=True):
        r = ids(tok, response)
        assert seq == ids(tok, PROMPT)[-(32 - len(r)) :] + r  # the prompt's end, then the whole response
    assert kept.first[0] != kept.second[0]


def test_a_pair_that_differs_only_where_truncation_cuts_is_dropped(tok):
    same_start = " the harbor at dawn was quiet and" * 10
    pairs = PairSet(
        ["A day:", "A day:"],
        [same_start + " joyful.", " joy"],
        [same_start + " grim.", " grief"],
        torch.tensor([1.0, 0.0], dtype=torch.float64),
    )
    with pytest.warns(RuntimeWarning, match=r"val set ood:x: 1 of 2 pairs are identical within 24 tokens"):
        kept = encode_pairs(tok, pairs, 24, "val set ood:x")
    assert kept.first == [ids(tok, "A day:") + ids(tok, " joy")]
    assert kept.second == [ids(tok, "A day:") + ids(tok, " grief")]
    assert kept.label.tolist() == [0.0]


def test_a_response_longer_than_the_budget_keeps_its_beginning(tok):
    response = " the football final ended in a storm of joy and fear" * 4
    assert encode(tok, ["A prompt that is cut away."], [response], 16) == [ids(tok, response)[:16]]


def test_special_tokens_wrap_the_truncated_ids(tok):
    from tokenizers import processors

    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    wrapped = AutoTokenizer.from_pretrained(ensure_preset("tiny", 60))
    wrapped.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    (seq,) = encode(wrapped, [PROMPT], [" joy"], 20)
    assert seq == [bos, *ids(tok, PROMPT)[-(19 - len(ids(tok, " joy"))) :], *ids(tok, " joy")]


def test_reward_model_accuracies_by_hand(tmp_path):
    from bench.loops.reward_model import correct
    from tasks.reward_model import load_reward_model, rm_scores

    model, tok = load_reward_model(str(ensure_preset("tiny", 60)))
    model.eval()
    pairs = encode_pairs(
        tok,
        PairSet(
            ["", "", "The day:"],
            ["a happy day", "sad rain", " joy"],
            ["sad rain", "a happy day", " grief"],
            torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
        ),
        256,
        "test set",
    )

    with torch.no_grad():
        a = rm_scores(model, tok, pairs.first)[0]
        b = rm_scores(model, tok, pairs.second)[0]
        # left padding: a text's score does not depend on its batch mates
        alone = torch.stack([rm_scores(model, tok, [t])[0][0] for t in pairs.first])
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-5)
    expected = [int((x > y) == (lab >= 0.5)) for x, y, lab in zip(a, b, pairs.label, strict=True)]
    assert correct(model, tok, pairs) == expected


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
    # per-pair 0/1 of every test set (their means are the accuracies), the OOD set worst on validation
    # evaluated on test, and the same pairs for another method of the config: paired comparisons
    m = rec["metrics"]
    assert {k: sum(v) / len(v) for k, v in m["per_pair"].items()} == pytest.approx(acc)
    val_ood = {k: v for k, v in m["val_accuracy"].items() if k != "id"}
    assert m["selected_set"] == min(val_ood, key=val_ood.get)
    assert m["worst_case_selected"] == acc[m["selected_set"]]
    plain = read_json(
        record_path(Cell("lexicon-prefs", "bt", 0, (*PREFS, "train.save_model=true")), tmp_path)
    )
    assert {k: len(v) for k, v in plain["metrics"]["per_pair"].items()} == {
        k: len(v) for k, v in m["per_pair"].items()
    }
    assert "worst OOD acc, val-selected" in out


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
    assert (pairs.prompt[0], pairs.first[0]) == ("\n\nUser: hi", "\n\nAssistant: hello")
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
