"""Capability retention with lm-eval: local tasks, in-memory scoring, `bench eval` on saved policies."""

import json

import pytest
import torch
from conftest import LEXICON_FAST
from transformers import AutoTokenizer

from bench.cli import main
from bench.core.lm import sequence_batch, sequence_logps
from bench.harness.records import read_json
from bench.harness.runner import Cell, record_path, run_cell
from bench.loops import capability
from bench.loops.capability import lmeval_scores, local_task_dir
from tasks.lexicon.presets import load_policy

pytestmark = pytest.mark.slow

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def contexts(monkeypatch) -> list[str]:
    """The contexts of the loglikelihood requests lm-eval sends the model, as it sends them."""
    from lm_eval.models.huggingface import HFLM

    seen, score = [], HFLM.loglikelihood

    def recording(self, requests, disable_tqdm=False):
        seen.extend(r.args[0] for r in requests)
        return score(self, requests, disable_tqdm)

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    return seen


@pytest.fixture
def two_shot_polarity(monkeypatch, tmp_path):
    """bench_polarity with two few-shot examples, drawn from its own items."""
    yaml = (local_task_dir() / "bench_polarity.yaml").read_text()
    (tmp_path / "bench_polarity.yaml").write_text(yaml + "num_fewshot: 2\nfewshot_split: test\n")
    monkeypatch.setattr(capability, "local_task_dir", lambda: tmp_path)


def test_local_tasks_are_deterministic_and_well_formed():
    folder = local_task_dir()
    items = [json.loads(x) for x in (folder / "bench_polarity.jsonl").read_text().splitlines()]
    assert len(items) == 120 and all(0 <= i["label"] < len(i["choices"]) for i in items)
    assert "dataset_path: json" in (folder / "bench_emotion_word.yaml").read_text()


def test_lmeval_accuracy_matches_an_independent_multiple_choice_scorer():
    model, tok = load_policy("tiny", steps=60)
    model.eval()
    scores = lmeval_scores(model, tok, ["bench_polarity"], limit=30)
    items = [json.loads(x) for x in (local_task_dir() / "bench_polarity.jsonl").read_text().splitlines()][:30]
    correct = 0
    for item in items:
        context = tok(f"{item['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        conts = [tok(f" {c}", add_special_tokens=False)["input_ids"] for c in item["choices"]]
        with torch.no_grad():
            ll = sequence_logps(model, sequence_batch([context] * len(conts), conts, tok.pad_token_id))
        correct += int(int(ll.argmax()) == item["label"])
    assert scores["bench_polarity/acc"] == pytest.approx(correct / 30)


def test_a_chat_model_is_scored_on_its_template_with_the_shots_as_turns(contexts, two_shot_polarity):
    model, tok = load_policy("tiny", steps=60)
    model.eval()
    plain = lmeval_scores(model, tok, ["bench_polarity"], limit=4)
    assert plain["bench_polarity/chat_template"] is False
    assert contexts and not any("<|" in c for c in contexts)
    assert all(c.count("Answer:") == 3 for c in contexts)  # the two shots are there too
    contexts.clear()
    tok.chat_template = CHAT
    chat = lmeval_scores(model, tok, ["bench_polarity"], limit=4)
    assert chat["bench_polarity/chat_template"] is True
    assert contexts and all(c.startswith("<|user|>") and c.endswith("<|assistant|>") for c in contexts)
    assert all(c.count("<|user|>") == 3 and c.count("<|assistant|>") == 3 for c in contexts)
    contexts.clear()
    assert lmeval_scores(model, tok, ["bench_polarity"], limit=4, chat_template=False) == plain
    assert contexts and not any("<|" in c for c in contexts)


def test_capabilities_in_memory_and_from_a_saved_policy(tmp_path, capsys):
    cell = Cell(
        "lexicon", "dpo", 0, (*LEXICON_FAST, "train.save_model=true", "train.lmeval_tasks=[bench_polarity]")
    )
    run_cell(cell, tmp_path)
    rec = read_json(record_path(cell, tmp_path))
    assert rec["status"] == "completed", rec.get("error")
    assert 0 <= rec["capabilities"]["bench_polarity/acc"] <= 1
    assert (cell.run_dir(tmp_path) / "policy" / "config.json").exists()
    assert rec["capabilities"]["bench_polarity/chat_template"] is False  # the tiny tokenizer has none
    policy = cell.run_dir(tmp_path) / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    tok.chat_template = CHAT
    tok.save_pretrained(policy)
    args = ["eval", "--tasks", "bench_emotion_word", "--results", str(tmp_path), "--limit", "20"]
    assert main([*args, "--chat-template", "off"]) == 0
    rec = read_json(record_path(cell, tmp_path))
    assert {"bench_polarity/acc", "bench_emotion_word/acc"} <= set(rec["capabilities"])
    assert rec["capabilities"]["bench_emotion_word/chat_template"] is False
    assert main(args) == 0  # auto: the saved tokenizer now has a template
    rec = read_json(record_path(cell, tmp_path))
    assert rec["capabilities"]["bench_emotion_word/chat_template"] is True
    assert rec["capabilities"]["bench_polarity/chat_template"] is False
    assert main(["report", "--results", str(tmp_path), "--no-figures"]) == 0
    assert "bench_emotion_word/acc" in capsys.readouterr().out
