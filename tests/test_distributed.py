"""One cell on two ranks (gloo on CPU): the step's gradient equals the single-rank gradient of the
same global batch for every method the LM loop runs; a 2-rank cell end to end, killed and resumed;
the same cell as 2 tasks of one SLURM job."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _lm_step import METHODS, global_batch, one_step
from conftest import LEXICON_FAST
from transformers import AutoModelForCausalLM

from bench.harness.runner import Cell, record_path, run_cell
from bench.loops.distributed import (
    SHARDS,
    SafeFileSystemReader,
    WeightsOnlyLoadPlanner,
    padded_shard,
    readable_shards,
    shard,
)
from bench.loops.monitor import METRICS, read_metrics
from bench.loops.train import disable_dropout
from tasks.lexicon.presets import ensure_preset, load_policy

pytestmark = pytest.mark.slow
TWO = (*LEXICON_FAST, "train.nproc=2")


def torchrun(script: Path, *args: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={port}", str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(script.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shards_are_contiguous_blocks_in_rank_order():
    items = list(range(7))
    assert [shard(items, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [*shard(items, 0, 2), *shard(items, 1, 2)] == items
    # padded to the longest block by repeating the block's last item (an empty one: the first item)
    assert [padded_shard(items, r, 3) for r in range(3)] == [([0, 1, 1], 2), ([2, 3, 3], 2), ([4, 5, 6], 3)]
    assert [padded_shard([7], r, 2) for r in range(2)] == [([7], 0), ([7], 1)]


def test_shard_metadata_holding_code_is_refused_unrun(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system is not torch\.distributed\.checkpoint"):
        SafeFileSystemReader(tmp_path).read_metadata()
    # a dotted name under the metadata module reaches its imports (os.system): refused too
    cmd = f"touch {tmp_path / 'ran'}".encode()
    dotted = b"\x80\x04ctorch.distributed.checkpoint.metadata\nos.system\n(X" + len(cmd).to_bytes(4, "little")
    (tmp_path / ".metadata").write_bytes(dotted + cmd + b"tR.")
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system is not"):
        SafeFileSystemReader(tmp_path).read_metadata()
    assert not (tmp_path / "ran").exists()


def test_shard_data_holding_code_is_refused_unrun(tmp_path):
    """The shards' non-tensor items (torch's planner reads them with a full torch.load) go through
    the weights-only unpickler; a real folder's metadata is read and named as readable."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    dcp.save({"w": torch.ones(2), "lr": Payload()}, checkpoint_id=tmp_path / f"{SHARDS}-3")
    state = {"w": torch.zeros(2), "lr": None}
    with pytest.raises(
        dcp.api.CheckpointException, match=r"GLOBAL posix\.system whose module posix is blocked"
    ):
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(tmp_path / f"{SHARDS}-3"),
            planner=WeightsOnlyLoadPlanner(),
        )
    assert not (tmp_path / "ran").exists()
    dcp.save({"w": torch.ones(2), "lr": 0.5}, checkpoint_id=tmp_path / f"{SHARDS}-4")
    state = {"w": torch.zeros(2), "lr": None}
    dcp.load(
        state, storage_reader=SafeFileSystemReader(tmp_path / f"{SHARDS}-4"), planner=WeightsOnlyLoadPlanner()
    )
    assert state["lr"] == 0.5 and torch.equal(state["w"], torch.ones(2))
    assert readable_shards(tmp_path, f"{SHARDS}-4")
    for bad in (f"{SHARDS}-5", "../elsewhere", str(tmp_path / f"{SHARDS}-4"), None, 4):
        assert not readable_shards(tmp_path, bad), bad  # missing, outside the run folder, not a name
    (tmp_path / f"{SHARDS}-4" / ".metadata").write_bytes(b"torn")
    assert not readable_shards(tmp_path, f"{SHARDS}-4")


@pytest.mark.parametrize(("micro_batch", "mode"), [(0, "replicate"), (2, "replicate"), (2, "fsdp")])
def test_two_rank_step_gradient_equals_the_single_rank_gradient(tmp_path, micro_batch, mode):
    ensure_preset("tiny", 60)  # built once before the ranks start
    out = tmp_path / "grads.pt"
    torchrun(Path(__file__).with_name("_dist_lm_worker.py"), str(out), str(micro_batch), mode)
    two = torch.load(out)
    assert sorted(two) == sorted(METHODS) and len(METHODS) >= 15
    for name in METHODS:
        policy, tok = load_policy("tiny", steps=60)
        disable_dropout(policy)
        torch.set_num_threads(1)
        one, value = one_step(policy, global_batch(tok), name, micro_batch)
        assert two[name]["value"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        # float32 sums in another order: errors far below the gradient's scale (its largest entry);
        # a tensor whose gradient is itself roundoff-sized is judged against that scale too
        scale = max(float(g.abs().max()) for g in one.values())
        assert scale > 1e-2, name
        for key, grad in one.items():
            err = float((two[name]["grads"][key] - grad).abs().max())
            assert err <= 1e-5 * scale + 1e-4 * float(grad.abs().max()), (name, key, err, scale)


def flat_keys(obj, prefix=""):
    if isinstance(obj, dict):
        return {k for key, v in obj.items() for k in flat_keys(v, f"{prefix}{key}.")} | {prefix[:-1]}
    return {prefix[:-1]}


def test_a_two_rank_cell_writes_one_record_with_the_single_rank_schema(tmp_path):
    one, two = Cell("lexicon", "rebel", 0, LEXICON_FAST), Cell("lexicon", "rebel", 0, TWO)
    assert run_cell(one, tmp_path) == "completed"
    assert run_cell(two, tmp_path) == "completed"
    a, b = (json.loads(record_path(c, tmp_path).read_text()) for c in (one, two))
    volatile = {"timings.peak_memory_mb_per_rank"}  # list contents differ in length
    assert flat_keys(a) - volatile == flat_keys(b) - volatile
    assert a["timings"]["world_size"] == 1 and b["timings"]["world_size"] == 2
    assert len(b["timings"]["peak_memory_mb_per_rank"]) == 2
    assert b["config"]["train"]["nproc"] == 2 and b["metrics"]["kl_ref"] >= 0
    assert b["reference"]["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    # both ranks' evaluation prompts are in the metrics: the whole test split, in order
    assert [s["prompt"] for s in b["samples"]["before"]] == [s["prompt"] for s in a["samples"]["before"]]


def run_straight(cell: Cell, root: Path) -> dict:
    status = run_cell(cell, root)
    assert status == "completed", record_path(cell, root).read_text()[-3000:]
    return json.loads(record_path(cell, root).read_text())


def kill_at_checkpoint(cell: Cell, root: Path, iteration: int = 3) -> dict:
    """Run ``cell`` through ``bench run``, SIGKILL the whole cell once its checkpoint reaches
    ``iteration``; the checkpoint the dead cell left."""
    cmd = [str(Path(sys.executable).with_name("bench")), "run", "--task", "lexicon", "--methods", cell.method]
    args = [*cmd, "--cluster", "debug", "--quiet", "--results", str(root), *cell.overrides]
    proc = subprocess.Popen(args, start_new_session=True)
    ckpt, st = cell.run_dir(root) / "checkpoint.pt", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        st = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
        if st is not None and st["iteration"] >= iteration:
            # the whole cell dies, as on a lost node: the launcher, torchrun, and both ranks (which
            # torchrun starts in sessions of their own)
            os.killpg(proc.pid, signal.SIGKILL)
            subprocess.run(["pkill", "-KILL", "-f", f"bench.harness.runner {root}"], check=False)
            break
        time.sleep(0.2)
    proc.wait()
    assert not record_path(cell, root).exists(), "killed before the end"
    return torch.load(ckpt, weights_only=False)


def test_a_two_rank_cell_killed_mid_run_resumes_exactly(tmp_path):
    args = (*TWO, "train.iterations=6", "train.checkpoint_every=1", "train.eval_every=3")
    cell = Cell("lexicon", "rebel", 0, args)
    straight = run_straight(cell, tmp_path / "straight")
    root = tmp_path / "killed"
    kill_at_checkpoint(cell, root)
    assert run_cell(cell, root) == "completed"
    resumed = json.loads(record_path(cell, root).read_text())
    assert resumed["resumed_at"] and resumed["resumed_at"][0] >= 3
    for key in ("curves", "samples", "metrics", "steps"):
        assert resumed[key] == straight[key], (key, resumed["resumed_at"])
    # rank 0 alone writes the live metrics, each iteration once; the ESS is over the global batch
    lines = read_metrics(cell.run_dir(root) / METRICS)
    assert [e["iteration"] for e in lines if e["event"] == "iteration"] == list(range(1, 7))
    assert all(e["ess"] == pytest.approx(6) for e in lines if e["event"] == "iteration")  # 6 pairs, 3 a rank


def test_an_fsdp_cell_matches_the_replicated_one_and_resumes_exactly(tmp_path):
    """W-REBEL sharded over 2 ranks (its double backward gathered): the replicated cell's numbers
    to float roundoff and a policy saved whole; with an odd number of test prompts (the blocks
    padded to one length), a SIGKILL mid-run resumed from the shards to exactly the uninterrupted
    run, and no shard folder left behind."""
    args = (*TWO, "train.iterations=6", "train.checkpoint_every=1", "train.eval_every=3")
    sharded = Cell("lexicon", "w-rebel", 0, (*args, "train.shard=fsdp", "train.save_model=true"))
    replicated = Cell("lexicon", "w-rebel", 0, (*args, "train.shard=replicate"))
    fsdp, whole = (
        run_straight(sharded, tmp_path / "straight"),
        run_straight(replicated, tmp_path / "straight"),
    )
    assert (fsdp["timings"]["sharding"], whole["timings"]["sharding"]) == ("fsdp", "replicate")
    assert flat_keys(fsdp) == flat_keys(whole)
    for a, b in zip(fsdp["curves"], whole["curves"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert fsdp["samples"] == whole["samples"] and len(fsdp["samples"]["before"]) == 4
    saved = AutoModelForCausalLM.from_pretrained(sharded.run_dir(tmp_path / "straight") / "policy")
    assert sum(p.numel() for p in saved.parameters()) == fsdp["model"]["parameters"]

    odd = Cell("lexicon", "w-rebel", 0, (*args, "task.n_test=13", "train.shard=fsdp"))
    straight = run_straight(odd, tmp_path / "straight")
    root = tmp_path / "killed"
    st = kill_at_checkpoint(odd, root)
    assert st["model"] is None and (odd.run_dir(root) / st["shards"] / ".metadata").exists()
    # the folder checkpoint.pt names and at most the next one (written when the kill came), no older
    later = {f"{SHARDS}-{st['iteration'] + 1}"}
    assert {p.name for p in odd.run_dir(root).glob(f"{SHARDS}-*")} - later == {st["shards"]}
    assert run_cell(odd, root) == "completed"
    resumed = json.loads(record_path(odd, root).read_text())
    assert resumed["resumed_at"] and resumed["resumed_at"][0] >= 3
    for key in ("curves", "samples", "metrics", "steps"):
        assert resumed[key] == straight[key], (key, resumed["resumed_at"])
    assert not list(odd.run_dir(root).glob(f"{SHARDS}-*"))


def test_an_fsdp_cell_on_offline_pairs_matches_the_replicated_one(tmp_path):
    """The WDPO protocol's fixed pair set, drawn from a sharded reference on every rank (no cache:
    each takes part in its forwards) and rank 0's handed to all: the replicated cell's numbers."""
    args = (*TWO, "train.data=offline")
    fsdp = run_straight(Cell("lexicon", "wdpo", 0, (*args, "train.shard=fsdp")), tmp_path)
    whole = run_straight(Cell("lexicon", "wdpo", 0, (*args, "train.shard=replicate")), tmp_path)
    assert fsdp["timings"]["sharding"] == "fsdp"
    for a, b in zip(fsdp["curves"], whole["curves"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_a_two_rank_cell_as_two_slurm_tasks(tmp_path):
    from test_slurm import cluster_up, wait_for

    if not cluster_up():
        if os.environ.get("BENCH_REQUIRE_SLURM") == "1":
            pytest.fail("BENCH_REQUIRE_SLURM=1 but no SLURM cluster answers")
        pytest.skip("no SLURM cluster")
    from bench.cli import main

    args = [
        "run",
        "--task",
        "lexicon",
        "--methods",
        "rebel",
        "--cluster",
        "slurm",
        "--results",
        str(tmp_path),
    ]
    assert main([*args, *TWO, "slurm.cpus_per_task=1", "slurm.mem_gb=2", "slurm.time_min=10"]) == 0
    cell = Cell("lexicon", "rebel", 0, TWO)
    rec = wait_for(
        lambda: record_path(cell, tmp_path).exists() and json.loads(record_path(cell, tmp_path).read_text()),
        400,
        "the 2-task record",
        poll=2,
    )
    assert rec["status"] == "completed", rec.get("error")
    assert rec["timings"]["world_size"] == 2


def test_building_a_preset_leaves_the_callers_rng_streams_alone(tmp_path, monkeypatch):
    # A cold cache once made a run's numbers differ from a warm-cache run of the same seed.
    import random

    import numpy as np

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    ensure_preset("tiny", 5)  # a cold build: it seeds and draws
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()
