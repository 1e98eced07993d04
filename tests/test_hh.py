"""HH-RLHF prompts drawn evenly from every configured subset (local folder stand-ins, no Hub)."""

import json
from collections import Counter
from dataclasses import asdict

import pytest

from bench.core.artifacts import artifact_dir
from tasks.hh import SIZES, SUBSETS, HHConfig, artifacts, prompt_splits

# rows per subset in each split's file; helpful-online asks each of its questions twice
ROWS = {"harmless-base": 30, "helpful-base": 24, "helpful-online": 20, "helpful-rejection-sampled": 40}
SHARED = "a question every subset asks"


def write_subsets(root, subsets=SUBSETS, shared=False):
    for subset in subsets:
        for split in ("train", "test"):
            n = ROWS[subset]
            questions = [f"{subset} {split} q{i // 2 if subset == 'helpful-online' else i}" for i in range(n)]
            questions += [SHARED] if shared else []
            (root / subset).mkdir(parents=True, exist_ok=True)
            (root / subset / f"{split}.jsonl").write_text(
                "".join(
                    json.dumps({"chosen": f"\n\nHuman: {q}\n\nAssistant: ok", "rejected": f"\n\nHuman: {q}"})
                    + "\n"
                    for q in questions
                )
            )
    return root


def subset_of(prompt) -> str:
    return next((s for s in SUBSETS if f"Human: {s} " in prompt.text), SHARED)


def config(root, **kw) -> HHConfig:
    return HHConfig(dataset=str(root), **({"n": 40, "n_val": 8, "n_test": 8} | kw))


def test_every_subset_is_drawn_in_proportion(tmp_path):
    splits = prompt_splits(config(write_subsets(tmp_path)))
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        assert Counter(subset_of(p) for p in splits[split]) == dict.fromkeys(SUBSETS, n // 4), split


def test_prompts_are_deduplicated_and_val_and_test_share_none(tmp_path):
    splits = prompt_splits(config(write_subsets(tmp_path, shared=True), n=100, n_val=40, n_test=40))
    for split in ("train", "val", "test"):
        texts = [p.text for p in splits[split]]
        assert len(texts) == len(set(texts)), split
    assert f"Human: {SHARED}\n\nAssistant:" in {p.text for p in splits["train"]}
    assert not {p.text for p in splits["val"]} & {p.text for p in splits["test"]}
    online = [p.text for p in splits["train"] if subset_of(p) == "helpful-online"]
    assert len(online) == len(set(online)) == 10  # its 20 rows ask 10 questions


def test_the_draw_is_fixed_by_data_seed(tmp_path):
    root = write_subsets(tmp_path)
    first = prompt_splits(config(root))
    assert prompt_splits(config(root)) == first
    other = prompt_splits(config(root, data_seed=1))
    assert [p.text for p in other["train"]] != [p.text for p in first["train"]]
    # each subset is shuffled on its own: dropping some leaves the others' order as it was
    fewer = prompt_splits(config(root, subsets=["helpful-base", "helpful-rejection-sampled"], n=20))
    for subset in ("helpful-base", "helpful-rejection-sampled"):
        assert [p.text for p in fewer["train"] if subset_of(p) == subset] == [
            p.text for p in first["train"] if subset_of(p) == subset
        ]


def test_a_flat_local_folder_is_one_subset(tmp_path):
    write_subsets(tmp_path, subsets=["helpful-base"])
    splits = prompt_splits(config(tmp_path / "helpful-base", n=20, n_val=4, n_test=4))
    assert {subset_of(p) for p in splits["train"]} == {"helpful-base"}


@pytest.mark.parametrize(
    "subsets", [["red-team-attempts"], ["harmless-base", "helpful"], [], ["helpful-base", "helpful-base"]]
)
def test_validate_refuses_unknown_or_repeated_subsets(subsets):
    with pytest.raises(ValueError, match=r"task\.subsets: distinct names among harmless-base"):
        HHConfig(subsets=subsets).validate()


def test_the_default_subsets_keep_the_sft_artifact_of_before():
    cfg = HHConfig()
    keys = ("dataset", "sft_epochs", "sft_lr", "prep_batch", "prep_max_len", "prep_examples")
    before = {k: v for k, v in asdict(cfg).items() if k in keys} | {"policy": SIZES[cfg.size]}
    assert artifacts(cfg) == artifact_dir("hh", before)
    assert artifacts(HHConfig(subsets=["harmless-base"])) != artifacts(cfg)
