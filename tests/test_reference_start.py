"""The head scaler and the iteration-0 evaluation are computed once per task config, evaluation and
seed, and shared through the reference cache by every method and radius of a sweep."""

import json
import shutil

import pytest
import torch
from conftest import LEXICON_FAST

import tasks
from bench.core.refcache import PACKAGES, REPO, code_files, code_fingerprint
from bench.harness.runner import Cell, record_path, run_cell
from bench.loops.train import start_spec
from tasks.lexicon.presets import ensure_preset, load_policy


def record(cell, root):
    return json.loads(record_path(cell, root).read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for this module's runs (the tiny preset is built once into it)."""
    path = tmp_path_factory.mktemp("start-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def calls(cache, monkeypatch) -> list[str]:
    """An empty reference cache, and the start computations each later run makes, in order."""
    shutil.rmtree(cache / "refcache", ignore_errors=True)
    import bench.loops.train as loop

    made: list[str] = []
    scaler, evaluate = loop.HeadScaler.from_reference, loop.evaluate_lm

    def counted_evaluate(*args, **kwargs):
        if kwargs["iteration"] == 0:
            made.append("evaluation")
        return evaluate(*args, **kwargs)

    def counted_scaler(*args, **kwargs):
        made.append("scaler")
        return scaler(*args, **kwargs)

    monkeypatch.setattr(loop.HeadScaler, "from_reference", counted_scaler)
    monkeypatch.setattr(loop, "evaluate_lm", counted_evaluate)
    return made


def run(cell: Cell, root, calls: list[str]) -> list[str]:
    """Run ``cell`` under ``root`` (it must complete); the start computations it made."""
    calls.clear()
    assert run_cell(cell, root) == "completed", record(cell, root).get("error")
    return list(calls)


@pytest.mark.slow
def test_the_second_method_of_a_seed_reuses_the_start_scores(tmp_path, cache, calls):
    first, second = Cell("lexicon", "dpo", 0, LEXICON_FAST), Cell("lexicon", "kldpo", 0, LEXICON_FAST)
    assert run(first, tmp_path, calls) == ["scaler", "evaluation"]
    assert run(second, tmp_path, calls) == [], "the cached scaler and iteration-0 evaluation were reused"
    assert record(second, tmp_path)["reference"] == record(first, tmp_path)["reference"]
    assert len(list((cache / "refcache").glob("*.pt"))) == 1


@pytest.mark.slow
def test_a_warm_cache_gives_exactly_the_cold_run(tmp_path, calls):
    """The start computations run in forked RNG streams: skipping them leaves every later draw (the
    rollouts, the labels, the evaluations) as it was."""
    cell = Cell("lexicon", "chi2-rebel", 0, LEXICON_FAST)
    assert run(cell, tmp_path / "cold", calls) == ["scaler", "evaluation"]
    assert run(cell, tmp_path / "warm", calls) == []
    cold, warm = record(cell, tmp_path / "cold"), record(cell, tmp_path / "warm")
    for key in ("metrics", "reference", "curves", "samples"):
        assert warm[key] == cold[key], key


@pytest.mark.slow
def test_a_changed_key_field_misses_the_cache(tmp_path, cache, calls):
    base = (*LEXICON_FAST, "train.iterations=2")
    assert run(Cell("lexicon", "dpo", 0, base), tmp_path, calls) == ["scaler", "evaluation"]
    assert run(Cell("lexicon", "dpo", 0, (*base, "eval.samples=2")), tmp_path, calls) == [
        "scaler",
        "evaluation",
    ]
    assert run(Cell("lexicon", "dpo", 1, base), tmp_path, calls) == ["scaler", "evaluation"]
    assert len(list((cache / "refcache").glob("*.pt"))) == 3


def spec(method: str = "dpo", seed: int = 0, *overrides: str) -> dict:
    cfg = Cell("lexicon", method, seed, (*LEXICON_FAST, *overrides)).config()
    return start_spec(cfg, tasks.get("lexicon").build(cfg.task), torch.device("cpu"))


def test_the_key_holds_what_changes_the_scores_and_not_the_method():
    base = spec()
    assert spec("kldpo", 0, "method.beta=0.5", "train.lr=0.1", "train.generator=hf") == base
    assert spec("dpo", 0, "train.iterations=9", "train.batch_size=3", "train.micro_batch=2") == base
    for changed in (
        spec("dpo", 1),
        spec("dpo", 0, "eval.samples=2"),
        spec("dpo", 0, "task.temperature=0.7"),
        spec("dpo", 0, "task.n_test=6"),
        spec("dpo", 0, "train.precision=bf16"),
        spec("dpo", 0, "train.grad_checkpointing=true"),
    ):
        assert changed != base


def test_the_code_fingerprint_changes_with_any_file_of_the_repository(tmp_path):
    names = {str(p.relative_to(REPO)) for p in code_files()}
    assert {"bench/loops/evaluate.py", "bench/core/lm.py", "tasks/lexicon/rewards.py"} <= names
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprint(tmp_path)
    assert code_fingerprint(tmp_path) == before
    reward = tmp_path / "tasks" / "lexicon" / "rewards.py"
    reward.write_text(reward.read_text() + "\n# an edit\n")
    code_fingerprint.cache_clear()
    assert code_fingerprint(tmp_path) != before


def test_the_key_holds_the_learned_reward_models_weights_not_only_its_folder(tmp_path):
    from transformers import AutoModelForSequenceClassification

    ensure_preset("tiny", 60)
    policy, tok = load_policy("tiny", steps=60)
    policy.config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(policy.config)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    first = spec("dpo", 0, f"task.reward_model={tmp_path / 'rm'}")
    assert first != spec() and spec("dpo", 0, f"task.reward_model={tmp_path / 'rm'}") == first
    with torch.no_grad():
        rm.score.weight.add_(1.0)  # the same folder, trained again
    rm.save_pretrained(tmp_path / "rm")
    assert spec("dpo", 0, f"task.reward_model={tmp_path / 'rm'}") != first
