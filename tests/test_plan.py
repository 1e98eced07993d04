"""bench plan: memory by hand on published shapes, advice that makes a cell fit, refusal before
submission, resources sized from the task, and one local job per GPU."""

import re
from pathlib import Path

import pytest

from bench.cli import main
from bench.harness import launch as launch_mod
from bench.harness import plan as plan_mod
from bench.harness.launch import launch, make_executor, submit_groups
from bench.harness.plan import (
    GIB,
    GPUS,
    estimate,
    gpu_named,
    resolve_shard,
    sized_resources,
    slurm_gpu,
    with_resolved_shard,
)
from bench.harness.runner import Cell
from bench.harness.sweep import SlurmConfig
from bench.loops.config import ConfigError

GPT2_PARAMS = 124_439_808  # GPT-2 small with its tied LM head (the published count)
GPT2_LARGE = ("task.size=gpt2-large",)


def test_static_memory_and_activations_by_hand():
    e = estimate(Cell("emotion", "rebel", 0), GPUS["H100"])
    # policy 16 B/param (fp32 weights + grads + AdamW m, v), reference and classifier 2 B/param
    assert e.models == {"policy": GPT2_PARAMS, "reference": GPT2_PARAMS, "reward": GPT2_PARAMS}
    assert e.static_gb * GIB == pytest.approx(20 * GPT2_PARAMS)
    # 128 pairs -> 256 rows of 128 tokens (the protocol's prompt + response budget); 34 h L + 12 V
    # bytes per token, plus 2 B/param of autocast weight copies
    per_token = 34 * 768 * 12 + 12 * 50257
    assert e.train_gb * GIB == pytest.approx(256 * 128 * per_token + 2 * GPT2_PARAMS)
    # KV cache of the largest generate call, the evaluation's 64 prompts x 4 samples = 256 rows (the
    # rollouts' are 64 x 2): 2 (k, v) x 12 layers x 768 x 2 bytes per token
    kv = 256 * 128 * 12 * 2 * 768 * 2
    assert e.generate_gb * GIB == pytest.approx(kv + 256 * 50257 * 4 * 3)
    capped = estimate(Cell("emotion", "rebel", 0, ("task.max_total_tokens=0",)), GPUS["H100"])
    assert capped.train_gb * GIB == pytest.approx(256 * (128 + 128) * per_token + 2 * GPT2_PARAMS)
    assert e.peak_gb * GIB == pytest.approx((e.static_gb + e.train_gb) * GIB * 1.1 + GIB)

    ckpt = estimate(Cell("emotion", "rebel", 0, ("train.grad_checkpointing=true",)), GPUS["H100"])
    per_token_ckpt = 2 * 768 * 12 + 34 * 768 + 12 * 50257
    assert ckpt.train_gb * GIB == pytest.approx(256 * 128 * per_token_ckpt + 2 * GPT2_PARAMS)
    wass = estimate(Cell("emotion", "w-rebel", 0), GPUS["H100"])
    assert wass.train_gb * GIB == pytest.approx(
        2 * 256 * 128 * per_token + 2 * GPT2_PARAMS
    )  # double backward
    sgd = estimate(Cell("emotion", "rebel", 0, ("train.optimizer=sgd",)), GPUS["H100"])
    assert sgd.static_gb * GIB == pytest.approx(12 * GPT2_PARAMS)


def test_the_advice_makes_a_cell_that_does_not_fit_fit():
    gpu = gpu_named("A100-40")
    cell = Cell("emotion", "w-rebel", 0, GPT2_LARGE)
    e = estimate(cell, gpu)
    assert not e.fits and e.peak_gb > 40
    advice = e.advice()
    assert advice.startswith("try train.grad_checkpointing=true")
    advised = advice.removeprefix("try ").split()
    assert estimate(Cell("emotion", "w-rebel", 0, (*GPT2_LARGE, *advised)), gpu).fits
    half = Cell("emotion", "w-rebel", 0, (*GPT2_LARGE, "train.micro_batch=64"))
    assert not estimate(half, gpu).fits and estimate(half, gpu_named("H200")).fits


def test_a_model_too_large_for_the_gpu_says_so():
    e = estimate(Cell("hh", "rebel", 0, ("task.size=pythia-2.8b",)), gpu_named("L40S"))
    assert not e.fits and "alone need" in e.advice() and "H200" in e.advice()


def test_run_refuses_before_submitting_anything(tmp_path):
    cells = [Cell("emotion", "w-rebel", 0, GPT2_LARGE)]
    with pytest.raises(ConfigError, match=r"would not fit in the 40 GB.*nothing was submitted"):
        launch(cells, tmp_path, name="x", cluster="slurm", slurm=SlurmConfig(gpu_mem_gb=40))
    assert not (tmp_path / ".sweeps" / "x" / "jobs.json").exists()


def test_slurm_resources_come_from_the_task_and_the_user_wins(tmp_path):
    paper = sized_resources([Cell("emotion", "rebel", 0)], SlurmConfig())
    assert paper.gpus_per_task == 1 and paper.cpus_per_task == 8
    host = (4 * GPT2_PARAMS + 2 * GPT2_PARAMS) / GIB + 8  # fp32 policy + bf16 classifier on the host
    assert paper.mem_gb == pytest.approx(int(host) + 1) and 30 <= paper.time_min <= 24 * 60
    mine = sized_resources([Cell("emotion", "rebel", 0)], SlurmConfig(gpus_per_task=2, mem_gb=64.0))
    assert (mine.gpus_per_task, mine.mem_gb, mine.cpus_per_task) == (2, 64.0, 8)
    cpu = sized_resources([Cell("lexicon", "rebel", 0, ("train.threads=3",))], SlurmConfig())
    assert (cpu.gpus_per_task, cpu.cpus_per_task, cpu.mem_gb) == (0, 3, 4.0)
    executor = make_executor("slurm", tmp_path, 60, SlurmConfig(), [Cell("emotion", "rebel", 0)])
    params = executor._executor.parameters
    assert params["gpus_per_task"] == 1 and params["cpus_per_task"] == 8


@pytest.mark.slow
def test_one_local_job_per_gpu_each_seeing_its_own(tmp_path):
    def visible(*_) -> str:  # defined here so that cloudpickle ships it by value to the workers
        import os

        return os.environ.get("CUDA_VISIBLE_DEVICES", "unset")

    executor = make_executor("local", tmp_path, 5, None)
    jobs = submit_groups(executor, visible, [[1], [2], [3]], str(tmp_path), [0, 3])
    assert [j.result() for j in jobs] == ["0", "3", "0"]
    executor = make_executor("local", tmp_path, 5, None)
    cpu_jobs = submit_groups(executor, visible, [[1], [2]], str(tmp_path), [])
    assert [j.result() for j in cpu_jobs] == ["", ""]  # a CPU task sees no GPU
    executor = make_executor("local", tmp_path, 5, None)
    ranked = submit_groups(executor, visible, [[1], [2], [3]], str(tmp_path), [0, 1, 2, 3], per_job=2)
    assert [j.result() for j in ranked] == ["0,1", "2,3", "0,1"]  # a 2-rank cell gets two GPUs


def test_gpu_tasks_run_one_at_a_time_locally_without_a_gpu(monkeypatch):
    monkeypatch.setattr(launch_mod, "usable_cores", lambda: 16)
    assert launch_mod.local_slots([Cell("emotion", "rebel", 0)], []) == 1
    assert launch_mod.local_slots([Cell("emotion", "rebel", 0)], [0, 1, 2]) == 3
    assert launch_mod.local_slots([Cell("lexicon", "rebel", 0)], [0, 1]) == 16
    two_ranks = Cell("emotion", "rebel", 0, ("train.nproc=2",))
    assert launch_mod.local_slots([two_ranks], [0, 1, 2, 3, 4]) == 2


def test_bench_plan_prints_every_cell_and_a_verdict(capsys):
    assert main(["plan", "--task", "emotion", "--methods", "rebel,w-rebel", "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "emotion/rebel seed=0" in out and "emotion/w-rebel seed=0" in out and "fits" in out
    assert "1 GPU, 8 CPUs" in out
    code = main(["plan", "--task", "emotion", "--methods", "w-rebel", "--gpu", "A100-40", *GPT2_LARGE])
    assert code == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_a_sharded_cell_divides_the_policy_state_and_the_reference_over_its_ranks():
    big, gpu = ("task.size=pythia-2.8b",), gpu_named("L40S")
    whole = estimate(Cell("hh", "rebel", 0, big), gpu)
    four = estimate(Cell("hh", "rebel", 0, (*big, "train.nproc=4", "train.shard=replicate")), gpu)
    parts = estimate(Cell("hh", "rebel", 0, (*big, "train.nproc=4", "train.shard=fsdp")), gpu)
    p, r = whole.models["policy"], whole.models["reward"]  # two reward models of r parameters
    # replicated ranks each hold everything, but train (activations, beside the 2 B/param of
    # autocast copies), sample and evaluate a quarter of the prompts
    assert four.static_gb == whole.static_gb
    # generation: the evaluation's calls of 4 samples, 64 of the 128 test prompts at a time on one
    # rank, the 32 of its block on each of 4 (the head scaler's 64 x 2 rows on every rank)
    assert four.generate_gb * 2 == pytest.approx(whole.generate_gb)
    assert (four.train_gb * GIB - 2 * p) * 4 == pytest.approx(whole.train_gb * GIB - 2 * p)
    assert four.s_per_iteration < whole.s_per_iteration / 3
    assert whole.models["reference"] == p and not whole.sharded and parts.sharded
    # AdamW state 16 B and the bf16 reference 2 B per policy parameter, over 4 ranks; the reward models whole
    assert parts.static_gb * GIB == pytest.approx((16 * p + 2 * p) / 4 + 2 * 2 * r)
    # plus two gathered fp32 layers (32 of them) in training, the whole fp32 policy while generating
    assert parts.train_gb * GIB == pytest.approx(four.train_gb * GIB + 2 * 4 * p / 32)
    assert parts.generate_gb * GIB == pytest.approx(four.generate_gb * GIB + 4 * p)
    w = estimate(Cell("hh", "w-rebel", 0, (*big, "train.nproc=4", "train.shard=fsdp")), gpu)
    w_whole = estimate(Cell("hh", "w-rebel", 0, (*big, "train.nproc=4", "train.shard=replicate")), gpu)
    assert w.train_gb * GIB == pytest.approx(w_whole.train_gb * GIB + 4 * p)  # gathered through the step
    assert parts.fits and not whole.fits
    advised = whole.advice().split("(")[1].split(")")[0].split()  # the fewest ranks, lightest change
    assert advised == ["train.nproc=4", "train.shard=fsdp"]
    assert estimate(Cell("hh", "rebel", 0, (*big, *advised)), gpu).fits
    lightest = ("train.grad_checkpointing=true", "train.micro_batch=1")
    assert not estimate(
        Cell("hh", "rebel", 0, (*big, "train.nproc=2", "train.shard=fsdp", *lightest)), gpu
    ).fits


def test_auto_shards_only_a_multi_rank_cell_that_does_not_fit_replicated():
    big = ("task.size=pythia-2.8b", "train.nproc=4")
    assert resolve_shard(Cell("hh", "rebel", 0, big), gpu_named("L40S")) == "fsdp"
    fits = ("task.size=pythia-1b", "train.nproc=4")
    assert resolve_shard(Cell("hh", "rebel", 0, fits), gpu_named("H200")) == "replicate"
    assert resolve_shard(Cell("hh", "rebel", 0, big), None) == "replicate"  # CPU ranks
    assert resolve_shard(Cell("hh", "rebel", 0, ("task.size=pythia-2.8b",)), gpu_named("L40S")) == "replicate"
    assert resolve_shard(Cell("lexicon", "rebel", 0, ("train.nproc=2",)), gpu_named("L40S")) == "replicate"


def test_a_job_resolves_auto_for_the_gpu_of_its_node(monkeypatch, tmp_path):
    monkeypatch.setattr(plan_mod, "local_gpu", lambda: gpu_named("L40S"))
    big = Cell("hh", "rebel", 0, ("task.size=pythia-2.8b", "train.nproc=4"))
    resolved = with_resolved_shard(big, tmp_path)
    assert resolved.shard == "fsdp" and resolved == big  # the same cell (the answer is not its identity)
    assert resolved.config_hash == big.config_hash
    assert with_resolved_shard(Cell("hh", "rebel", 0, ("task.size=pythia-2.8b",)), tmp_path).shard == ""
    pinned = Cell("hh", "rebel", 0, ("task.size=pythia-2.8b", "train.nproc=4", "train.shard=replicate"))
    assert with_resolved_shard(pinned, tmp_path).shard == ""  # only auto is resolved
    lmeval = Cell("hh", "rebel", 0, (*big.overrides, "train.lmeval_tasks=[bench_polarity]"))
    assert with_resolved_shard(lmeval, tmp_path).shard == "replicate"  # lm-eval needs a whole policy
    # a cell that resumes keeps what its checkpoint was written with, whatever the GPU now
    run_dir = big.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert with_resolved_shard(big, tmp_path).shard == "replicate"
    (run_dir / "checkpoint-shards-3").mkdir()
    monkeypatch.setattr(plan_mod, "local_gpu", lambda: gpu_named("H200"))
    assert with_resolved_shard(big, tmp_path).shard == "fsdp"


def test_the_readmes_armorm_memory_table_is_the_codes():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| w?-?rebel, [13]B", line)]
    assert len(rows) == 6
    eighty = slurm_gpu(SlurmConfig())
    for row in rows:
        name, _, static, train, peak, on_80, on_h200, seconds = (c.strip() for c in row.strip("|").split("|"))
        method, size, *sharded = (part.strip() for part in name.split(","))
        overrides = (f"task.size={size.lower()}", *(("train.nproc=8", "train.shard=fsdp") if sharded else ()))
        cell = Cell("armorm", method, 0, overrides)
        e, h100 = estimate(cell, eighty), estimate(cell, GPUS["H100"])
        assert [f"{x:.1f}" for x in (e.static_gb, e.train_gb, e.peak_gb)] == [static, train, peak], name
        assert on_80.startswith("fits") == e.fits and on_h200 == "fits", name
        assert f"{h100.s_per_iteration:.1f}" == seconds, name
