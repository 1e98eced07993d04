"""The paper tasks' code paths end to end on tiny local stand-ins (no Hub): emotion, armorm, hh."""

import json
import random

import pytest
import torch
from _armorm_standin import write_armorm, write_policy
from transformers import GPT2Config, GPT2ForSequenceClassification

from bench.cli import main
from bench.harness.plan import sized_resources
from bench.harness.records import read_json
from bench.harness.runner import Cell, record_path, run_cell
from bench.harness.sweep import load_sweep
from tasks.armorm import HEADS
from tasks.hub import HubUnavailable, ScoreCache
from tasks.lexicon.corpus import sentences
from tasks.lexicon.presets import load_policy

pytestmark = pytest.mark.slow
CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TRAIN = (
    "train.iterations=2",
    "train.batch_size=4",
    "train.eval_every=2",
    "task.n=8",
    "task.n_val=4",
    "task.n_test=6",
    "task.max_new_tokens=6",
)


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    model, tok = load_policy("tiny", steps=60)
    tok.chat_template = CHAT
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, (name, labels) in enumerate((("helpful-rm", 1), ("harmless-rm", 1)), start=1):
        cfg = GPT2Config.from_pretrained(root / "base", num_labels=labels, pad_token_id=tok.pad_token_id)
        torch.manual_seed(i)
        GPT2ForSequenceClassification(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    texts = sentences(90, seed=3)
    for split, rows in (("train", texts[:50]), ("validation", texts[50:70]), ("test", texts[70:])):
        jsonl(root / "emotion" / f"{split}.jsonl", [{"text": t, "label": i % 6} for i, t in enumerate(rows)])
        jsonl(
            root / "hh" / f"{split}.jsonl",
            [
                {
                    "chosen": f"\n\nHuman: {t}\n\nAssistant: sure.",
                    "rejected": f"\n\nHuman: {t}\n\nAssistant: no.",
                }
                for t in rows
            ],
        )
    # ArmoRM: a tiny checkpoint in the published layout, tiny Llama policies whose chat templates differ by
    # the date in their system block (as Llama-3.2's does from day to day), HelpSteer2-shaped rows
    write_armorm(root / "armorm-rm", seed=1)
    write_policy(root / "llama", date="01 Dec 2026")
    write_policy(root / "llama-next-day", date="02 Dec 2026")
    grades = dict.fromkeys(("helpfulness", "correctness", "coherence", "complexity", "verbosity"), 2)
    rows = [{"prompt": t, "response": f"ok {j}", **grades} for t in texts[:50] for j in (0, 1)]
    jsonl(root / "helpsteer" / "train.jsonl", rows)
    jsonl(root / "helpsteer" / "test.jsonl", [{"prompt": t, "response": "ok", **grades} for t in texts[50:]])
    return root


def finished(cell, root):
    rec = read_json(record_path(cell, root))
    assert rec["status"] == "completed", rec.get("error")
    return rec


def test_emotion_prepare_then_run(standins, tmp_path):
    task = (
        f"task.dataset={standins / 'emotion'}",
        f"task.size={standins / 'base'}",
        f"task.reward_base={standins / 'base'}",
        "task.sft_epochs=1",
        "task.rm_epochs=1",
        "task.prep_batch=16",
    )
    with pytest.raises(RuntimeError, match="bench prepare emotion"):  # artifacts first
        import tasks
        from bench.loops.config import build_config

        tasks.get("emotion").build(build_config("emotion", "rebel", task).task)
    assert main(["prepare", "emotion", "--results", str(tmp_path), *task]) == 0
    cell = Cell("emotion", "chi2-rebel", 0, (*task, *TRAIN))
    run_cell(cell, tmp_path)
    rec = finished(cell, tmp_path)
    assert rec["metrics"]["objectives"] == ["sadness", "joy", "love", "anger", "fear", "surprise"]
    assert rec["metrics"]["seen_pair"] == ["joy", "sadness"]
    alphas = sorted(m["pair_alpha"] for m in rec["metrics"]["mixtures"].values() if "pair_alpha" in m)
    assert alphas == [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    geo = Cell("emotion", "dpo", 0, (*task, *TRAIN, "task.mixing=geometric"))
    run_cell(geo, tmp_path)
    finished(geo, tmp_path)


def test_armorm_native_scorer_on_raw_prompts_and_the_score_cache(standins, tmp_path, monkeypatch):
    """One armorm cell on local stand-ins, through the real task code; the reward model sees the raw
    prompt, so a score (and its cache entry) does not depend on the policy's template or the date."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    task = (
        f"task.dataset={standins / 'helpsteer'}",
        f"task.size={standins / 'llama'}",
        f"task.reward_model={standins / 'armorm-rm'}",
        "task.reward_dtype=float32",
        "task.reward_batch=3",
    )
    cell = Cell("armorm", "kl-rebel", 0, (*task, *TRAIN))
    run_cell(cell, tmp_path)
    rec = finished(cell, tmp_path)
    assert rec["metrics"]["objectives"] == list(HEADS) and len(HEADS) == 20
    names = [m for m in rec["metrics"]["mixtures"]]
    assert any("helpsteer-coherence" in n for n in names) and any("ArmoRM" in n for n in names)
    cache = next((tmp_path / "cache" / "armorm-scores").glob("*.jsonl"))
    lines = cache.read_text().count("\n")
    assert lines > 0
    import tasks
    from bench.loops.config import build_config

    def built(size: str, *extra: str):
        over = (*task, *TRAIN, f"task.size={standins / size}", *extra)
        return tasks.get("armorm").build(build_config("armorm", "rebel", over).task)

    # The protocol's pools: distinct prompts in file order, shuffled by random.Random(1234) (test: 1235);
    # training pool first, validation from the other end; the policy sees the raw text (no template).
    plain = built("llama")
    texts = sentences(90, seed=3)
    train_order, test_order = list(texts[:50]), list(texts[50:])
    random.Random(1234).shuffle(train_order)
    random.Random(1235).shuffle(test_order)
    assert [p.text for p in plain.prompts("train")] == train_order[:8]
    assert [p.text for p in plain.prompts("val")] == train_order[-4:]
    assert [p.text for p in plain.prompts("test")] == test_order[:6]
    assert plain.sampling.top_k == 50 and plain.sampling.max_prompt_tokens == 1024 and not plain.standardize
    today, tomorrow = (
        built("llama", "task.chat_template=true"),
        built("llama-next-day", "task.chat_template=true"),
    )

    prompt, later = today.prompts("test")[0].text, tomorrow.prompts("test")[0].text
    assert "Today Date: 01 Dec 2026" in prompt and "Today Date: 02 Dec 2026" in later
    raw = today.panel.raw_prompt(prompt)
    assert raw == tomorrow.panel.raw_prompt(later) and raw in prompt and "<|" not in raw
    assert isinstance(today.panel.panel, ScoreCache)
    first = today.score([prompt, prompt], ["hello there", "hello there"])
    assert first.shape == (2, 20) and torch.equal(first[0], first[1])
    assert ScoreCache.key(raw, "hello there") in cache.read_text(), "the cache keys on the raw prompt"
    assert cache.read_text().count("\n") == lines + 1
    again = tomorrow.score([later, raw], ["hello there", "hello there"])
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[0])
    assert cache.read_text().count("\n") == lines + 1, "the next day's template hits the same entry"
    direct = today.panel.panel.panel.score([raw], ["hello there"])  # the ArmoRM panel, uncached
    torch.testing.assert_close(direct[0], first[0])
    with pytest.raises(KeyError, match="not from this task's splits"):
        today.score(["some other prompt"], ["hello there"])


def test_hh_prepare_then_run(standins, tmp_path):
    task = (
        f"task.dataset={standins / 'hh'}",
        f"task.size={standins / 'base'}",
        f"task.helpful_rm={standins / 'helpful-rm'}",
        f"task.harmless_rm={standins / 'harmless-rm'}",
        "task.sft_epochs=1",
        "task.prep_batch=16",
    )
    assert main(["prepare", "hh", "--results", str(tmp_path), *task]) == 0
    cell = Cell("hh", "wdpo", 0, (*task, *TRAIN))
    run_cell(cell, tmp_path)
    rec = finished(cell, tmp_path)
    assert rec["metrics"]["objectives"] == ["helpful", "harmless"]
    assert rec["samples"]["before"][0]["prompt"].startswith("Human: ")


def test_offline_hub_tasks_fail_fast_with_instructions(standins, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tasks.hub import load_splits

    with pytest.raises(HubUnavailable, match="huggingface-cli download --repo-type dataset dair-ai/emotion"):
        load_splits("dair-ai/emotion", {"train": "train"})
    import tasks
    from bench.loops.config import build_config

    with pytest.raises(HubUnavailable, match=r"huggingface-cli download RLHFlow/ArmoRM-Llama3-8B-v0\.1"):
        tasks.get("armorm").build(
            build_config(
                "armorm",
                "rebel",
                (f"task.dataset={standins / 'helpsteer'}", f"task.size={standins / 'llama'}", *TRAIN),
            ).task
        )


def test_paper_sweeps_validate():
    for name, task in (("paper-emotion", "emotion"), ("paper-armorm", "armorm"), ("paper-hh", "hh")):
        sweep = load_sweep(name)
        resources = sized_resources(sweep.cells, sweep.config.slurm)  # from the task, not the file
        assert sweep.config.task == task and resources.gpus_per_task >= 1 and len(sweep.cells) >= 30
