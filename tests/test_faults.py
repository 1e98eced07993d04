"""Faults a cell must survive without losing work or running foreign code (issue 17, items 1 and 4):
hostile and truncated checkpoints and cache entries, a kill between the record and the checkpoint's
removal, and a full disk during a checkpoint write."""

import errno
import json
import warnings

import pytest
import torch
from conftest import LEXICON_FAST

import bench.harness.runner as runner
from bench.core.artifacts import load_tensors
from bench.harness.runner import Cell, record_path, run_cell
from bench.loops.train import PAIR_TYPES

pytestmark = pytest.mark.slow
RESUMABLE = (*LEXICON_FAST, "train.iterations=4", "train.eval_every=2", "train.checkpoint_every=1")


class Payload:
    """Unpickling it creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def record(cell, root):
    return json.loads(record_path(cell, root).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    cell = Cell("lexicon", "chi2-rebel", 0, RESUMABLE)
    assert run_cell(cell, root) == "completed"
    return record(cell, root)


@pytest.mark.parametrize("content", ["payload", "truncated"])
def test_a_bad_checkpoint_never_runs_and_the_cell_starts_afresh(tmp_path, uninterrupted, content):
    cell = Cell("lexicon", "chi2-rebel", 0, RESUMABLE)
    ckpt = cell.run_dir(tmp_path) / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    if content == "payload":
        torch.save({"iteration": 1, "model": Payload(marker)}, ckpt)
    else:
        ckpt.write_bytes(b"PK\x03\x04 not a whole zip archive")
    with pytest.warns(
        RuntimeWarning, match=r"unreadable checkpoint .*checkpoint\.pt.*moved to checkpoint\.pt\.unreadable"
    ):
        assert run_cell(cell, tmp_path) == "completed"
    assert not marker.exists(), "the pickled payload ran"
    assert (ckpt.parent / "checkpoint.pt.unreadable").exists() and not ckpt.exists()
    rec = record(cell, tmp_path)
    assert rec["resumed_at"] == [] and rec["metrics"] == uninterrupted["metrics"]


def test_a_hostile_reference_cache_entry_never_runs_and_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    cell = Cell("lexicon", "dpo", 0, (*LEXICON_FAST, "train.data=offline"))
    run_cell(cell, tmp_path / "first")
    (entry,) = (
        e
        for e in (tmp_path / "cache" / "refcache").glob("*.pt")
        if load_tensors(e, PAIR_TYPES)["spec"]["kind"] == "offline-pairs"  # not the start scores
    )
    marker = tmp_path / "pwned"
    torch.save({"fingerprint": "x", "spec": {}, "value": Payload(marker)}, entry)
    with pytest.warns(RuntimeWarning, match="unreadable reference cache"):
        assert run_cell(cell, tmp_path / "second") == "completed"
    assert not marker.exists(), "the pickled payload ran"
    assert record(cell, tmp_path / "second")["metrics"] == record(cell, tmp_path / "first")["metrics"]
    assert load_tensors(entry, PAIR_TYPES)["fingerprint"] != "x", "the entry was rebuilt"


def test_a_kill_between_training_and_the_record_keeps_the_checkpoint(tmp_path, monkeypatch, uninterrupted):
    cell = Cell("lexicon", "chi2-rebel", 0, RESUMABLE)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs

    monkeypatch.setattr(runner, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, tmp_path)
    assert (cell.run_dir(tmp_path) / "checkpoint.pt").exists(), "the run's state survives until its record"
    monkeypatch.undo()
    assert run_cell(cell, tmp_path) == "completed"
    rec = record(cell, tmp_path)
    assert rec["resumed_at"] == [3] and rec["metrics"] == uninterrupted["metrics"]
    assert not (cell.run_dir(tmp_path) / "checkpoint.pt").exists(), "removed once the record is written"


def test_a_full_disk_during_a_checkpoint_leaves_no_temp_file_and_records_the_failure(tmp_path, monkeypatch):
    cell = Cell("lexicon", "chi2-rebel", 0, RESUMABLE)
    real_save = torch.save

    def full_disk(value, path, *args, **kwargs):
        real_save(value, path, *args, **kwargs)  # the bytes land, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_cell(cell, tmp_path) == "failed"
    folder = cell.run_dir(tmp_path)
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name], "the partial temp file was removed"
    rec = record(cell, tmp_path)
    assert rec["status"] == "failed" and "No space left on device" in rec["error"]["message"]
