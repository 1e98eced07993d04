"""The language-model loop end to end on the lexicon task with a tiny preset."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LEXICON_FAST
from test_live_metrics import tensorboard_scalars

from bench.harness.runner import Cell, record_path, run_cell
from bench.loops.callbacks import StopRun
from bench.loops.monitor import METRICS, read_metrics

pytestmark = pytest.mark.slow


def record(cell, root):
    return json.loads(record_path(cell, root).read_text())


@pytest.mark.parametrize(
    "method,extra",
    [
        ("rebel", ("method.anchor=prev_iterate",)),
        ("chi2-rebel", ()),
        ("w-rebel", ()),
        ("wdpo", ("train.data=offline", "method.w_form=per_sample_sq")),
        ("gr-dpo", ("task.protocol=random_pair", "task.seen=[joy,trust,anticipation]")),
        ("kldpo", ("task.mixing=geometric", "method.labels=argmax")),
    ],
)
def test_end_to_end_tiny_model(tmp_path, method, extra):
    cell = Cell("lexicon", method, 0, (*LEXICON_FAST, *extra))
    assert run_cell(cell, tmp_path) == "completed", record(cell, tmp_path).get("error")
    rec = record(cell, tmp_path)
    metrics, ref = rec["metrics"], rec["reference"]
    assert ref["kl_ref"] == pytest.approx(0.0, abs=1e-6), "iteration 0 is the reference itself"
    assert metrics["kl_ref"] != 0.0 and metrics["worst_case"] <= metrics["mean_over_test"]
    assert [c["iteration"] for c in rec["curves"]] == [0, 2, 4]
    assert len(rec["samples"]["before"]) == len(rec["samples"]["after"]) == 4
    assert rec["timings"]["train_tokens_per_s"] > 0 and rec["timings"]["peak_memory_mb"]["rss"] > 0
    assert not (cell.run_dir(tmp_path) / "checkpoint.pt").exists()


def test_every_evaluation_reaches_the_callback_and_a_stop_prunes_the_run(tmp_path):
    cell = Cell("lexicon", "rebel", 0, LEXICON_FAST)
    seen = []

    def prune_at_4(iteration, scores):
        seen.append((iteration, scores["val_worst_case"]))
        if iteration == 4:
            raise StopRun("pruned")

    with pytest.raises(StopRun):
        run_cell(cell, tmp_path, on_eval=prune_at_4)
    assert [i for i, _ in seen] == [2, 4] and all(isinstance(v, float) for _, v in seen)
    assert record(cell, tmp_path)["status"] == "pruned"


def test_same_seed_same_numbers_and_micro_batching_matches(tmp_path):
    base = Cell("lexicon", "chi2-dpo", 0, LEXICON_FAST)
    micro = Cell("lexicon", "chi2-dpo", 0, (*LEXICON_FAST, "train.micro_batch=2"))
    run_cell(base, tmp_path / "a")
    run_cell(base, tmp_path / "b")
    run_cell(micro, tmp_path / "c")
    a, b, c = (record(x, tmp_path / d) for x, d in ((base, "a"), (base, "b"), (micro, "c")))
    assert a["metrics"] == b["metrics"] and a["curves"] == b["curves"]
    # Accumulation only reorders float32 sums: the runs stay together to float tolerance.
    assert c["metrics"]["kl_ref"] == pytest.approx(a["metrics"]["kl_ref"], rel=1e-3, abs=1e-4)


def test_killed_run_resumes_with_identical_metrics(tmp_path):
    overrides = (*LEXICON_FAST, "train.iterations=12", "train.eval_every=4", "train.checkpoint_every=1")
    overrides = (*overrides, "train.report_to=[tensorboard]")
    cell = Cell("lexicon", "chi2-rebel", 0, overrides)
    run_cell(cell, tmp_path / "whole")
    whole = record(cell, tmp_path / "whole")

    root = tmp_path / "killed"
    exe = Path(sys.executable).with_name("bench")
    cmd = [
        str(exe),
        "run",
        "--task",
        "lexicon",
        "--methods",
        "chi2-rebel",
        "--cluster",
        "debug",
        "--results",
        str(root),
        "--quiet",
        *overrides,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cell.run_dir(root) / "checkpoint.pt"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            it = torch.load(ckpt, weights_only=False)["iteration"]
            if it >= 3:
                proc.kill()
                killed_at = it
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run ended before it could be killed"
    assert not record_path(cell, root).exists()
    assert run_cell(cell, root) == "completed"
    resumed = record(cell, root)
    assert resumed["resumed_at"] and resumed["resumed_at"][0] >= 3
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["curves"] == whole["curves"]
    assert resumed["samples"] == whole["samples"]
    assert resumed["steps"] == whole["steps"] and [s["iteration"] for s in whole["steps"]] == list(
        range(1, 13)
    )
    lines = read_metrics(cell.run_dir(root) / METRICS)  # one live file, each iteration exactly once
    assert [e["iteration"] for e in lines if e["event"] == "iteration"] == list(range(1, 13))
    assert [e["iteration"] for e in lines if e["event"] == "eval"] == [0, 4, 8, 12]
    assert [e["resumed_at"] for e in lines if e["event"] == "start"] == [None, resumed["resumed_at"][0]]
    # the same tracker run continues: TensorBoard drops the steps after the checkpoint, then logs them anew
    logged = tensorboard_scalars(cell.run_dir(root), "train/robust_value")
    assert [(k, pytest.approx(v)) for k, v in logged] == [
        (s["iteration"], s["robust_value"]) for s in whole["steps"]
    ]


def test_offline_reference_data_is_computed_once_and_refused_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    base = (*LEXICON_FAST, "train.data=offline")
    first, second = Cell("lexicon", "dpo", 0, base), Cell("lexicon", "kldpo", 0, base)
    run_cell(first, tmp_path / "r")
    import bench.loops.train as loop

    calls = []
    real = loop.sample_pairs
    monkeypatch.setattr(loop, "sample_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_cell(second, tmp_path / "r")
    assert record(second, tmp_path / "r")["status"] == "completed" and calls == [], (
        "the cached pairs were reused"
    )
    stored = {e: torch.load(e, weights_only=False) for e in (tmp_path / "cache" / "refcache").glob("*.pt")}
    entries = [e for e, value in stored.items() if value["spec"]["kind"] == "offline-pairs"]
    assert len(entries) == 1  # beside it, the head scaler and iteration-0 evaluation (start-scores)
    monkeypatch.setattr(loop, "sample_pairs", real)
    # A cache hit and a cold cache give the same run.
    run_cell(first, tmp_path / "again")
    assert record(first, tmp_path / "again")["metrics"] == record(first, tmp_path / "r")["metrics"]
    stored = torch.load(entries[0], weights_only=False)
    stored["fingerprint"] = "0" * 64
    torch.save(stored, entries[0])
    run_cell(first, tmp_path / "stale")
    rec = record(first, tmp_path / "stale")
    assert rec["status"] == "failed" and "stale reference cache" in rec["error"]["message"]


def test_prev_iterate_anchor_equals_an_explicit_forward_of_the_sampling_policy():
    import methods
    from bench.core.lm import chunked_logps
    from bench.loops.train import PairBatch
    from tasks.lexicon.presets import load_policy

    policy, tok = load_policy("tiny", steps=60)
    policy.eval()
    from bench.core.lm import sequence_batch

    seqs = sequence_batch([[5, 6, 7]] * 4, [[8, 9], [10, 11, 12], [13], [14, 15]], tok.pad_token_id)
    rewards, pref = torch.randn(2, 2), torch.tensor([1.0, 0.0])
    implicit = PairBatch(seqs, rewards, pref, torch.zeros(2, dtype=torch.long))
    explicit = PairBatch(
        seqs,
        rewards,
        pref,
        torch.zeros(2, dtype=torch.long),
        chunked_logps(policy, seqs, 1.0, 8).view(2, -1).T,
    )
    method = methods.get("rebel")
    a, _ = implicit.losses(policy, method, {"eta": 0.5}, 1.0, torch.arange(2))
    b, _ = explicit.losses(policy, method, {"eta": 0.5}, 1.0, torch.arange(2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, (rewards[:, 0] - rewards[:, 1]) ** 2, rtol=0, atol=1e-6)  # h = 0 at theta_t


def test_group_options_count_the_tasks_groups_not_a_batchs():
    """GR-DPO on an LM task weighs the ordered objective pairs of a random-pairs protocol (ArmoRM:
    drawn uniformly, equal shares) or the training prompts' groups with their counts."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from bench.loops.train import group_options
    from tasks.lexicon.prompts import Prompt
    from tasks.mixtures import pair_protocol

    cfg = OmegaConf.create({"method": {"group_update": "official"}})
    names = ["a", "b", "c", "d"]
    pairs = SimpleNamespace(protocol=pair_protocol(names, (0, 1, 2), 0.5, random_pairs=True))
    opts = group_options(pairs, cfg)
    assert (opts.n_groups, opts.update) == (6, "official") and opts.shares.tolist() == [1.0] * 6
    prompts = [Prompt("x", g, i) for i, g in enumerate([0, 2, 2, 0, 2])]  # group 1 has no prompt
    grouped = SimpleNamespace(protocol=pair_protocol(names, (0, 1), 0.5), prompts=lambda split: prompts)
    opts = group_options(grouped, cfg)
    assert opts.n_groups == 3 and opts.shares.tolist() == [2.0, 0.0, 3.0]


def test_methods_of_a_seed_are_evaluated_with_common_random_numbers(tmp_path):
    """Every method of a seed is scored on the same prompts with the same sampling streams: the
    reference (iteration 0) scores equal per prompt across methods whose training differs, and
    evaluate_lm gives the same responses whatever the caller's RNG state; other seeds differ. The
    record holds the per-prompt heads of every test and validation prompt, averaged over
    eval.samples responses."""
    over = (*LEXICON_FAST, "eval.samples=2")
    cells = [Cell("lexicon", m, s, over) for m, s in (("dpo", 0), ("chi2-rebel", 0), ("dpo", 1))]
    recs = []
    for cell in cells:
        assert run_cell(cell, tmp_path) == "completed", record(cell, tmp_path).get("error")
        recs.append(record(cell, tmp_path))
    dpo0, rebel0, dpo1 = recs
    assert dpo0["reference"]["per_prompt"] == rebel0["reference"]["per_prompt"]
    assert dpo0["reference"]["per_prompt"] != dpo1["reference"]["per_prompt"]
    assert dpo0["metrics"]["per_prompt"] != rebel0["metrics"]["per_prompt"]  # trained apart
    heads = dpo0["metrics"]["per_prompt"]
    assert len(heads["test"]) == 12 and len(heads["val"]) == 8
    assert len({len(row) for row in heads["test"]}) == 1 and dpo0["metrics"]["eval_samples"] == 2
    assert dpo0["curves"][-1]["worst_case"] == dpo0["metrics"]["worst_case"]
    sel = dpo0["metrics"]["worst_case_selected"]
    rewards = [m["reward"] for m in dpo0["metrics"]["mixtures"].values()]
    assert dpo0["metrics"]["worst_case"] <= sel <= max(rewards)

    import tasks
    from bench.loops.config import build_config
    from bench.loops.evaluate import HeadScaler, evaluate_lm

    cfg = build_config("lexicon", "dpo", list(LEXICON_FAST))
    task = tasks.get("lexicon").build(cfg.task)
    policy, tok = task.load_policy()

    def scored(seed: int, noise: int) -> dict:
        torch.manual_seed(noise)  # a training run's RNG, wherever it happens to be
        torch.rand(noise + 1)
        kw = {"task": task, "tok": tok, "reference": policy, "scaler": HeadScaler(), "iteration": 4}
        return evaluate_lm(policy, seed=seed, samples=2, **kw)[0]["per_prompt"]

    assert scored(0, 1) == scored(0, 2) != scored(1, 1)
