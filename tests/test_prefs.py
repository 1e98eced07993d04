"""Preference datasets of the reward-model tasks: rows of each layout into shared-prompt pairs, and
Unified-Feedback's OOD sets, which may not be its own sources."""

import pytest

from tasks.hub import HubUnavailable
from tasks.prefs import (
    OOD_LOADERS,
    UnifiedFeedbackConfig,
    _by_prompt,
    _hhh_pairs,
    _mt_bench_pairs,
    _split_conversations,
    _unified_pairs,
)


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_unified_feedback_rows_share_all_turns_but_the_last_answer():
    history = (("user", "hi"), ("assistant", "hello"), ("user", "more?"))
    rows = [
        {
            "conv_A": turns(*history, ("assistant", "sure")),
            "conv_B": turns(*history, ("assistant", "no")),
            "conv_A_rating": 5,
            "conv_B_rating": 1,
        },
        {  # a tie: dropped
            "conv_A": turns(("user", "x"), ("assistant", "a")),
            "conv_B": turns(("user", "x"), ("assistant", "b")),
            "conv_A_rating": 2,
            "conv_B_rating": 2,
        },
        {
            "conv_A": turns(("user", "y"), ("assistant", "worse")),
            "conv_B": turns(("user", "y"), ("assistant", "better")),
            "conv_A_rating": 1,
            "conv_B_rating": 3,
        },
    ]
    pairs = _unified_pairs(rows)
    assert pairs.prompt == ["\n\nUser: hi\n\nAssistant: hello\n\nUser: more?", "\n\nUser: y"]
    assert pairs.first == ["\n\nAssistant: sure", "\n\nAssistant: worse"]
    assert pairs.second == ["\n\nAssistant: no", "\n\nAssistant: better"]
    assert pairs.label.tolist() == [1.0, 0.0]


def test_the_prompt_ends_at_a_user_turn_so_a_shared_answer_stays_in_both_responses():
    longer = turns(("user", "q"), ("assistant", "same"), ("user", "more?"), ("assistant", "x"))
    shorter = turns(("user", "q"), ("assistant", "same"))
    assert _split_conversations(longer, shorter) == (
        "\n\nUser: q",
        "\n\nAssistant: same\n\nUser: more?\n\nAssistant: x",
        "\n\nAssistant: same",
    )


def test_hhh_rows_put_the_best_choice_first():
    rows = [
        {"input": "Can you help me?", "targets": {"choices": ["No.", "Sure, how?"], "labels": [0, 1]}},
        {
            "input": "Hi there.\n\nAssistant: Hello!\n\nHuman: Tell me a joke.",
            "targets": {"choices": ["A pun.", "No."], "labels": [1, 0]},
        },
    ]
    pairs = _hhh_pairs(rows)
    assert pairs.prompt == [
        "\n\nUser: Can you help me?",
        "\n\nUser: Hi there.\n\nAssistant: Hello!\n\nUser: Tell me a joke.",
    ]
    assert pairs.first == ["\n\nAssistant: Sure, how?", "\n\nAssistant: A pun."]
    assert pairs.second == ["\n\nAssistant: No.", "\n\nAssistant: No."]
    assert pairs.label.tolist() == [1.0, 1.0]


def test_mt_bench_rows_end_at_the_judged_turn():
    def conversation(m: str) -> list[dict]:
        return turns(("user", "Q1"), ("assistant", f"{m} A1"), ("user", "Q2"), ("assistant", f"{m} A2"))

    rows = [
        {"conversation_a": conversation("x"), "conversation_b": conversation("y"), "winner": w, "turn": t}
        for w, t in (("model_a", 1), ("model_b", 2), ("tie", 1))
    ]
    pairs = _mt_bench_pairs(rows)
    assert pairs.prompt == ["\n\nUser: Q1", "\n\nUser: Q1"]  # turn 2: the first answers differ already
    assert pairs.first == ["\n\nAssistant: x A1", "\n\nAssistant: x A1\n\nUser: Q2\n\nAssistant: x A2"]
    assert pairs.second == ["\n\nAssistant: y A1", "\n\nAssistant: y A1\n\nUser: Q2\n\nAssistant: y A2"]
    assert pairs.label.tolist() == [1.0, 0.0]  # the tie is dropped


def test_ood_halves_share_no_prompt():
    rows = [
        {"input": p, "targets": {"choices": [f"good {i}", f"bad {i}"], "labels": [1, 0]}}
        for i, p in enumerate(["a", "a", "b", "c", "b", "d"])
    ]
    test, val = _by_prompt(_hhh_pairs(rows))
    assert test.first == ["\n\nAssistant: good 0", "\n\nAssistant: good 1", "\n\nAssistant: good 3"]
    assert val.first == ["\n\nAssistant: good 2", "\n\nAssistant: good 4", "\n\nAssistant: good 5"]
    assert not set(test.prompt) & set(val.prompt)


def test_default_ood_sets_are_grm_s_and_not_unified_feedback_sources():
    cfg = UnifiedFeedbackConfig()
    assert set(cfg.ood.values()) == {"HuggingFaceH4/hhh_alignment", "lmsys/mt_bench_human_judgments"}
    cfg.validate()


@pytest.mark.parametrize("dataset", ["Anthropic/hh-rlhf", "berkeley-nest/Nectar", "openbmb/ultrafeedback"])
def test_a_source_of_unified_feedback_is_refused_as_ood(dataset):
    with pytest.raises(ValueError, match=rf"task\.ood: src = {dataset} is one of llm-blender/Unified"):
        UnifiedFeedbackConfig(ood={"src": dataset}).validate()


def test_an_ood_dataset_without_a_loader_is_refused():
    with pytest.raises(ValueError, match=r"task\.ood: x = some/dataset has no loader; known: HuggingFaceH4"):
        UnifiedFeedbackConfig(ood={"x": "some/dataset"}).validate()


@pytest.mark.parametrize("dataset", sorted(OOD_LOADERS))
def test_ood_loaders_fail_fast_offline(dataset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match=f"huggingface-cli download --repo-type dataset {dataset}"):
        OOD_LOADERS[dataset](dataset)
