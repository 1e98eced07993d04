"""bench/loops/trackers.py: each tracker writes offline, and its own library reads back the scalars at
their steps, the table and the summary; a resumed cell continues the same tracker run; a tracker
that is unknown, not installed, or fails at run time never fails a cell."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest

from bench.loops import trackers
from bench.loops.trackers import TrackerRun, check_trackers, open_trackers

NAMES = ["tensorboard", "wandb", "mlflow", "trackio"]
LABEL = "lexicon/w-rebel seed=0 method.rho0=0.1"
RUN_ID = "0123456789abcdef"
ONLINE = ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL")
LOCAL_DIRS = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "TRACKIO_DIR")
ROWS = [{"prompt": "Tell me | about", "response": "a\nstory", "reward": 0.3}, {"prompt": "Hi", "reward": 0.7}]


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No tracker reaches the network or $HOME: the libraries' online switches are unset and their
    caches and settings live in a temporary folder (trackio reads TRACKIO_DIR once, at import)."""
    home = tmp_path_factory.mktemp("trackers-home")
    with pytest.MonkeyPatch.context() as patch:
        for var in ONLINE:
            patch.delenv(var, raising=False)
        for var in LOCAL_DIRS:
            patch.setenv(var, str(home / var.lower()))
        yield


def cell(tmp_path: Path, resume_step: int | None = None) -> TrackerRun:
    run_dir = tmp_path / "results" / "lexicon" / "cell"
    run_dir.mkdir(parents=True, exist_ok=True)
    return TrackerRun(
        run_dir=run_dir,
        results_root=tmp_path / "results",
        name=LABEL,
        run_id=RUN_ID,
        project=f"bench-{tmp_path.name}",  # trackio's store is shared by the module's tests
        group="sweep-a",
        tags=("method:w-rebel", "task:lexicon", "radius:rho0=0.1"),
        config={"method": {"name": "w-rebel", "rho0": 0.1}, "train": {"iterations": 5}, "seeds": [0, 1]},
        resume_step=resume_step,
    )


def track(name: str, run: TrackerRun, steps: range, offset: float = 0.0, final: bool = True) -> None:
    """One attempt of a cell: ``train/robust_value = step / 10 + offset`` at each step and, when
    ``final``, an eval scalar at step 5, a table and a summary. No tracker may turn itself off."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [tracker] = open_trackers([name], run)
        for step in steps:
            tracker.log({"train/robust_value": step / 10 + offset}, step)
        if final:
            tracker.log({"eval/worst_case": 0.25}, 5)
            tracker.table("samples/before", ROWS)
            tracker.summary({"worst_case": 0.4})
        tracker.close()
    assert not [str(w.message) for w in caught if str(w.message).startswith("tracker ")]


# Readers: each library's own, returning [(step, value)] in the order logged.


def tensorboard_events(run: TrackerRun):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    return events


def read_tensorboard(run: TrackerRun, key: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in tensorboard_events(run).Scalars(key)]


def wandb_records(path: Path):
    """The records of a ``.wandb`` file, wandb's protobuf ``Record`` in leveldb-log framing (wandb
    0.31 reads it in its Go core; its Python datastore is gone): a 7-byte header, then 32 KiB
    blocks of chunks, each ``crc32 (of type + data), length, type`` then the data."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-filled trailer
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            return
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos += 7 + length
        parts.append(chunk)
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_attempts(run: TrackerRun) -> list[list]:
    """The records of each offline-run folder of the cell, oldest first. ``run.finish()`` hands the
    run's end to wandb's service process, which writes the file on its own time: this waits until
    every file ends with the run's exit record."""
    files = list((run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(300):
        attempts = [list(wandb_records(path)) for path in files]
        if all(records and records[-1].HasField("exit") for records in attempts):
            break
        time.sleep(0.1)
    return sorted(
        attempts, key=lambda records: [r.run.start_time.ToNanoseconds() for r in records if r.run.run_id]
    )


def wandb_key(item) -> tuple[str, ...]:
    return (item.key,) if item.key else tuple(item.nested_key)


def read_wandb(run: TrackerRun, key: str) -> list[tuple[int, float]]:
    return [
        (record.history.step.num, json.loads(item.value_json))
        for records in wandb_attempts(run)
        for record in records
        if record.HasField("history")
        for item in record.history.item
        if wandb_key(item) == (key,)
    ]


def mlflow_client(run: TrackerRun):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{run.results_root / 'mlruns' / 'mlflow.db'}")


def mlflow_run_id(run: TrackerRun) -> str:
    return (run.run_dir / "mlflow_run_id").read_text().strip()


def read_mlflow(run: TrackerRun, key: str) -> list[tuple[int, float]]:
    history = mlflow_client(run).get_metric_history(mlflow_run_id(run), key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.timestamp)]


def read_trackio(run: TrackerRun, key: str) -> list[tuple[int, float]]:
    from trackio.sqlite_storage import SQLiteStorage

    return [(log["step"], log[key]) for log in SQLiteStorage.get_logs(run.project, run.name) if key in log]


READ = {"tensorboard": read_tensorboard, "wandb": read_wandb, "mlflow": read_mlflow, "trackio": read_trackio}


def approx_points(points: list[tuple[int, float]]):
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in points]  # TensorBoard: float32


# What each tracker writes besides the scalars: the summary, the table and the run's identity.


def check_tensorboard_extras(run: TrackerRun) -> None:
    events = tensorboard_events(run)
    assert read_tensorboard(run, "summary/worst_case") == approx_points([(5, 0.4)])
    [table] = events.Tensors("samples/before/text_summary")
    text = table.tensor_proto.string_val[0].decode()
    assert table.step == 5 and "| prompt | response | reward |" in text and "| Tell me \\| about |" in text
    [config] = events.Tensors("config/text_summary")
    assert config.step == 0 and '"rho0": 0.1' in config.tensor_proto.string_val[0].decode()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.summary_metadata)


def check_wandb_extras(run: TrackerRun) -> None:
    [records] = wandb_attempts(run)
    [meta] = [r.run for r in records if r.HasField("run")]
    assert (meta.run_id, meta.display_name, meta.run_group) == (RUN_ID, LABEL, "sweep-a")
    assert meta.project == run.project and list(meta.tags) == list(run.tags)
    summary = [r.summary for r in records if r.HasField("summary")]
    assert {wandb_key(i): json.loads(i.value_json) for s in summary for i in s.update}[("worst_case",)] == 0.4
    [path] = [
        json.loads(i.value_json)
        for r in records
        if r.HasField("history") and r.history.step.num == 5
        for i in r.history.item
        if wandb_key(i) == ("samples/before", "path")
    ]
    [folder] = (run.run_dir / "wandb").glob("offline-run-*")
    table = json.loads((folder / "files" / path).read_text())
    assert table["columns"] == ["prompt", "response", "reward"] and table["data"][1] == ["Hi", None, 0.7]


def check_mlflow_extras(run: TrackerRun) -> None:
    client = mlflow_client(run)
    found = client.get_run(mlflow_run_id(run))
    assert found.info.run_name == LABEL and found.info.status == "FINISHED"
    assert found.data.params["method.rho0"] == "0.1" and found.data.params["seeds"] == "[0, 1]"
    assert found.data.tags["group"] == "sweep-a" and found.data.tags["radius"] == "rho0=0.1"
    assert read_mlflow(run, "summary/worst_case") == [(5, 0.4)]
    table = Path(client.download_artifacts(found.info.run_id, "samples/before_5.json", str(run.run_dir)))
    table = json.loads(table.read_text())
    assert table["columns"] == ["prompt", "response", "reward"] and table["data"][1] == ["Hi", None, 0.7]


def check_trackio_extras(run: TrackerRun) -> None:
    from trackio.sqlite_storage import SQLiteStorage

    assert read_trackio(run, "summary/worst_case") == [(5, 0.4)]
    [table] = [log for log in SQLiteStorage.get_logs(run.project, run.name) if "samples/before" in log]
    assert table["step"] == 5 and table["samples/before"]["_value"][0]["prompt"] == "Tell me | about"
    config = SQLiteStorage.get_run_config(run.project, run.name)
    assert config["method"] == {"name": "w-rebel", "rho0": 0.1} and config["_Group"] == "sweep-a"


EXTRAS = {
    "tensorboard": check_tensorboard_extras,
    "wandb": check_wandb_extras,
    "mlflow": check_mlflow_extras,
    "trackio": check_trackio_extras,
}


@pytest.mark.parametrize("name", NAMES)
def test_reads_back_scalars_at_their_steps(name, tmp_path):
    run = cell(tmp_path)
    track(name, run, range(1, 6))
    assert READ[name](run, "train/robust_value") == approx_points([(s, s / 10) for s in range(1, 6)])
    assert READ[name](run, "eval/worst_case") == [(5, 0.25)]
    EXTRAS[name](run)


@pytest.mark.parametrize("name", NAMES)
def test_resumed_cell_continues_the_same_run(name, tmp_path):
    """Steps 1-5, then a resume from the checkpoint at 3 logging 4-6 with new values: every
    tracker holds one run whose last value per step is the resumed attempt's."""
    track(name, cell(tmp_path), range(1, 6), final=False)
    if name == "mlflow":
        first_id = mlflow_run_id(cell(tmp_path))
    run = cell(tmp_path, resume_step=3)
    track(name, run, range(4, 7), offset=1.0, final=False)
    points = READ[name](run, "train/robust_value")
    expected = [(1, 0.1), (2, 0.2), (3, 0.3), (4, 1.4), (5, 1.5), (6, 1.6)]
    assert sorted(dict(points).items()) == approx_points(expected)
    if name == "tensorboard":
        assert points == approx_points(expected)  # the purge dropped the first attempt's 4 and 5
    elif name == "wandb":
        attempts = wandb_attempts(run)
        assert len(attempts) == 2
        assert [r.run.run_id for records in attempts for r in records if r.HasField("run")] == [RUN_ID] * 2
    elif name == "mlflow":
        assert mlflow_run_id(run) == first_id
        [experiment] = [e for e in mlflow_client(run).search_experiments() if e.name == run.project]
        assert len(mlflow_client(run).search_runs([experiment.experiment_id])) == 1
    elif name == "trackio":
        from trackio.sqlite_storage import SQLiteStorage

        assert SQLiteStorage.get_runs(run.project) == [LABEL]


def test_check_trackers_unknown_name_is_one_line():
    with pytest.raises(ValueError) as error:
        check_trackers(["tensorboard", "nope"])
    assert str(error.value) == (
        "train.report_to: unknown tracker 'nope' (known: mlflow, tensorboard, trackio, wandb)"
    )


def test_check_trackers_missing_library_is_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name)
    )
    check_trackers(["tensorboard", "mlflow", "trackio"])
    with pytest.raises(ValueError) as error:
        check_trackers(["tensorboard", "wandb"])
    assert str(error.value) == "train.report_to: wandb is not installed; pip install 'bench[wandb]'"


def test_every_tracker_names_its_extra():
    assert set(trackers.TRACKERS) == set(trackers.EXTRAS) == set(NAMES)


def test_checking_and_importing_leave_the_libraries_unloaded(tmp_path):
    """``check_trackers`` finds the libraries without importing them; and trackio, left to itself,
    keeps its store under the results folder."""
    code = (
        "import sys; from pathlib import Path; from bench.loops.trackers import *\n"
        f"check_trackers({NAMES!r})\n"
        "assert not {'tensorboard', 'wandb', 'mlflow', 'trackio'} & set(sys.modules), sys.modules.keys()\n"
        f"root = Path({str(tmp_path)!r}); (root / 'cell').mkdir()\n"
        "run = TrackerRun(root / 'cell', root, 'cell', 'ab12ab12ab12', 'bench-x', '', (), {}, None)\n"
        "[t] = open_trackers(['trackio'], run); t.log({'a': 1.0}, 1); t.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, capture_output=True)
    assert (tmp_path / "trackio" / "bench-x.db").exists()


def test_a_failing_tracker_warns_once_and_never_raises(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def add_scalar(self, *args, **kwargs):
        calls.append(args)
        raise OSError("No space left on device:\n/results")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    run = cell(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [tracker] = open_trackers(["tensorboard"], run)
        for step in range(1, 4):
            tracker.log({"train/robust_value": step / 10}, step)
        tracker.table("samples/before", ROWS)
        tracker.summary({"worst_case": 0.4})
        tracker.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "tracker tensorboard is off for this run: log failed (OSError: No space left on device: /results)"
    ]
    assert len(calls) == 1


def test_a_tracker_that_cannot_open_is_left_out(tmp_path, monkeypatch):
    import wandb

    def init(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = open_trackers(["nope", "wandb", "tensorboard"], cell(tmp_path))
    assert [t.name for t in opened] == ["tensorboard"]
    opened[0].close()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "tracker nope is off for this run: open failed (ValueError: train.report_to: unknown tracker 'nope'"
        " (known: mlflow, tensorboard, trackio, wandb))",
        "tracker wandb is off for this run: open failed (ConnectionError: api.wandb.ai unreachable)",
    ]
