"""Experiment trackers through their own libraries (``train.report_to``, the names TRL uses).

One small adapter per tracker behind the ``Tracker`` interface, registered in ``TRACKERS`` beside
its code. Each one opens a run for one cell and writes offline by default; it goes online when the
user configures the library through that library's own usual environment variables:

- **tensorboard**: event files in ``<run_dir>/tensorboard/``; always local (``tensorboard --logdir
  <results>`` serves every cell).
- **wandb**: offline, a folder ``<run_dir>/wandb/offline-run-*/`` per attempt of the cell, which
  ``wandb sync`` later uploads as one run; online with ``WANDB_MODE=online`` and W&B's usual
  credentials and settings (``WANDB_API_KEY`` or ``wandb login``, ``WANDB_ENTITY``,
  ``WANDB_BASE_URL``).
- **mlflow**: offline, the SQLite store ``<results>/mlruns/mlflow.db`` with artifacts in
  ``<results>/mlruns/artifacts/``; online with ``MLFLOW_TRACKING_URI`` (a tracking server, with
  ``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``).
- **trackio**: offline, ``<results>/trackio/<project>.db`` (or ``$TRACKIO_DIR`` when set); online
  with ``TRACKIO_SPACE_ID`` (a Hugging Face Space, with the Hub token) or ``TRACKIO_SERVER_URL``
  (a self-hosted server, with ``TRACKIO_WRITE_TOKEN``).

A resumed cell (``resume_step`` set) continues the same tracker run. The steps after the
checkpoint were logged once already by the interrupted attempt and are logged again:
TensorBoard drops the old ones (a purge at ``resume_step + 1``); W&B keeps a run's history
increasing (online, or at ``wandb sync`` of the offline folders, each of which holds one attempt's
steps), so it keeps the interrupted attempt's values up to the step it reached and takes the new
ones after; MLflow and trackio cannot delete logged points, so their histories hold both values
for those steps, the resumed attempt's last (a reader takes the last value per step).

``open_trackers`` guards every adapter: a failure at run time (no network, bad credentials, a
library exception) is one warning naming the tracker and the error, and turns that tracker off
for the cell; it never fails a cell. The libraries are imported only when a tracker opens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

TRACKERS: dict[str, type] = {}
"""Tracker name (``train.report_to``) -> its adapter class, constructed as ``cls(run)``."""

EXTRAS: dict[str, str] = {}
"""Tracker name -> the bench extra that installs it, also the name of the module it imports."""


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker needs to know about the cell it tracks."""

    run_dir: Path  # the cell's run folder (exists)
    results_root: Path  # the results folder (MLflow's and trackio's local stores live under it)
    name: str  # the cell's label: the tracker run's display name
    run_id: str  # a stable id of the cell (hex), the same when the cell resumes
    project: str  # e.g. "bench-lexicon"
    group: str  # the sweep name ("" if none)
    tags: tuple[str, ...]  # e.g. ("method:w-rebel", "task:lexicon")
    config: dict  # the cell's whole config (nested plain values)
    resume_step: int | None  # the iteration the cell resumed from, None on a fresh start


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def table(self, name: str, rows: list[dict]) -> None: ...

    def summary(self, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def register(name: str, extra: str) -> Callable[[type], type]:
    """Class decorator: ``TRACKERS[name] = cls`` and ``EXTRAS[name] = extra``."""

    def add(cls: type) -> type:
        TRACKERS[name] = cls
        EXTRAS[name] = extra
        return cls

    return add


def check_trackers(names: Sequence[str]) -> None:
    """Raise a one-line ValueError for an unknown tracker or one whose library is not installed
    (found without importing it)."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"train.report_to: unknown tracker {name!r} (known: {', '.join(sorted(TRACKERS))})"
            )
        if importlib.util.find_spec(EXTRAS[name]) is None:
            raise ValueError(f"train.report_to: {name} is not installed; pip install 'bench[{EXTRAS[name]}]'")


def open_trackers(names: Sequence[str], run: TrackerRun) -> list[Tracker]:
    """The named trackers opened for ``run``, each guarded; one that fails to open is a warning and
    is left out."""
    opened: list[Tracker] = []
    for name in names:
        try:
            check_trackers([name])
            opened.append(_Guarded(name, TRACKERS[name](run)))
        except Exception as error:
            _warn(name, "open", error)
    return opened


def _warn(name: str, what: str, error: Exception) -> None:
    message = " ".join(str(error).split())[:300]
    warnings.warn(
        f"tracker {name} is off for this run: {what} failed ({type(error).__name__}: {message})",
        RuntimeWarning,
        stacklevel=3,
    )


class _Guarded:
    """A tracker whose calls never raise: the first failure warns and turns the tracker off (it is
    then closed quietly, so that its files and threads are released)."""

    def __init__(self, name: str, tracker: Tracker):
        self.name = name
        self._tracker: Tracker | None = tracker

    def _call(self, what: str, *args: Any) -> None:
        tracker = self._tracker
        if tracker is None:
            return
        try:
            getattr(tracker, what)(*args)
        except Exception as error:
            self._tracker = None
            _warn(self.name, what, error)
            if what != "close":
                with suppress(Exception):
                    tracker.close()

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._call("log", scalars, step)

    def table(self, name: str, rows: list[dict]) -> None:
        self._call("table", name, rows)

    def summary(self, values: dict[str, float]) -> None:
        self._call("summary", values)

    def close(self) -> None:
        self._call("close")
        self._tracker = None


def _flatten(config: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"method": {"rho0": 0.1}}`` -> ``("method.rho0", 0.1)``."""
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _columns(rows: list[dict]) -> list[str]:
    """Every key of the rows, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def after_earlier_files(folder: Path) -> None:
    """Wait (under a second) until a new event file would sort after every one in ``folder``.
    TensorBoard reads a folder's files in name order, ``events.out.tfevents.<unix second>.<host>.
    <pid>...``: an attempt that starts within the second of the one before could sort first
    (a lower pid), and the earlier attempt's purge would then drop the new steps."""
    names = [p.name.split(".") for p in folder.glob("events.out.tfevents.*")]
    seconds = [int(parts[3]) for parts in names if len(parts) > 3 and parts[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


@register("tensorboard", "tensorboard")
class TensorBoardTracker:
    """Event files in ``run_dir/tensorboard`` through torch's ``SummaryWriter``: scalars under their
    keys; the config as markdown text ``config`` at step 0; each table as a markdown text under its
    name, at the last step logged; the summary as scalars ``summary/<key>`` at that step, and with
    the config flattened to dotted keys as an HParams session (so the HParams dashboard lists the
    cells of a sweep with their hyperparameters and headline metrics). The writer starts with a
    purge at ``resume_step + 1`` (at 0 on a fresh start), so TensorBoard drops what an earlier
    attempt logged from there on and shows each step once."""

    def __init__(self, run: TrackerRun):
        from torch.utils.tensorboard import SummaryWriter

        self._config = run.config
        self._step = run.resume_step or 0
        purge = 0 if run.resume_step is None else run.resume_step + 1
        folder = run.run_dir / "tensorboard"
        after_earlier_files(folder)
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge)
        if run.resume_step is None:
            config = json.dumps(run.config, indent=2, default=str)
            self._writer.add_text("config", f"```json\n{config}\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), step)
        self._step = max(self._step, step)

    def table(self, name: str, rows: list[dict]) -> None:
        self._writer.add_text(name, _markdown_table(rows), self._step)

    def summary(self, values: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {f"summary/{key}": float(value) for key, value in values.items()}
        params = {
            key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
            for key, value in _flatten(self._config)
        }
        for part in hparams(params, metrics):  # the experiment, session start and session end
            self._writer.file_writer.add_summary(part, self._step)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, self._step)

    def close(self) -> None:
        self._writer.close()


@register("wandb", "wandb")
class WandbTracker:
    """A W&B run in ``run_dir/wandb`` with ``id=run_id`` and ``resume="allow"`` (a resumed cell
    continues the same run), ``reinit="create_new"`` (each cell of a process gets its own run),
    offline unless ``WANDB_MODE`` says otherwise (offline it neither logs in nor opens a
    connection). Scalars go to the history at their step; tables as ``wandb.Table`` at the last
    step logged; the summary to ``run.summary``. Console capture is off: the cell's output is not
    the run's."""

    def __init__(self, run: TrackerRun):
        import wandb

        self._wandb = wandb
        self._step = run.resume_step or 0
        self._run = wandb.init(
            project=run.project,
            name=run.name,
            group=run.group or None,
            tags=list(run.tags),
            config=run.config,
            dir=run.run_dir,
            id=run.run_id,
            resume="allow",
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log({key: float(value) for key, value in scalars.items()}, step=step)
        self._step = max(self._step, step)

    def table(self, name: str, rows: list[dict]) -> None:
        columns = _columns(rows)
        table = self._wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self._run.log({name: table}, step=self._step)

    def summary(self, values: dict[str, float]) -> None:
        self._run.summary.update({key: float(value) for key, value in values.items()})

    def close(self) -> None:
        self._run.finish()


@register("mlflow", "mlflow")
class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (not the fluent API's process-wide active run). The
    store is ``MLFLOW_TRACKING_URI`` when set, else SQLite at ``results_root/mlruns/mlflow.db`` with
    artifacts in ``results_root/mlruns/artifacts`` (MLflow 3 refuses the ``./mlruns`` file store
    unless ``MLFLOW_ALLOW_FILE_STORE`` is set; mlflow-skinny reaches SQLite through SQLAlchemy and
    Alembic, which Optuna installs). Experiment = project; tags ``group`` and each ``key:value``
    tag; params = the config flattened to dotted keys (values cut to MLflow's length limit);
    scalars as metrics at their step; tables as artifacts ``<name>_<step>.json`` via ``log_table``
    (at the last step logged; ``log_table`` appends to an existing file); the summary as
    metrics ``summary/<key>`` at the last step logged. The run id is kept in
    ``run_dir/mlflow_run_id``: a resumed cell continues that run, a fresh start opens a new one."""

    ID_FILE = "mlflow_run_id"

    def __init__(self, run: TrackerRun):
        from mlflow import MlflowClient

        self._step = run.resume_step or 0
        store = run.results_root / "mlruns"
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), (store / "artifacts").as_uri()
        if uri:
            lock, artifacts = nullcontext(), None  # the server's default artifact store
        else:
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            # Cells of parallel jobs open the store at once: one creates its tables (Alembic's
            # migrations, seconds) and the experiment while the others wait.
            lock = FileLock(store / "mlflow.db.lock")
        with lock:
            self._client = client = MlflowClient(uri)
            experiment_id = self._experiment(run.project, artifacts)
        id_file = run.run_dir / self.ID_FILE
        if run.resume_step is not None and id_file.exists():
            self.run_id = id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {key: value for key, _, value in (tag.partition(":") for tag in run.tags)}
            if run.group:
                tags["group"] = run.group
            self.run_id = client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
            id_file.write_text(self.run_id + "\n")
        self._log_params(run.config)

    def _experiment(self, name: str, artifacts: str | None) -> str:
        """The id of the experiment ``name``, created if need be."""
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # a server's other job created it meanwhile
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, config: dict) -> None:
        """The config's params that the run lacks (a resumed run has them; MLflow forbids changing
        one)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        logged = self._client.get_run(self.run_id).data.params
        params = [
            Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
            for key, value in _flatten(config)
            if key not in logged
        ]
        for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=batch)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._log_metrics(scalars, step)
        self._step = max(self._step, step)

    def table(self, name: str, rows: list[dict]) -> None:
        data = {column: [row.get(column) for row in rows] for column in _columns(rows)}
        with warnings.catch_warnings():  # MLflow's own select_dtypes call, deprecated in pandas 3
            warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
            self._client.log_table(self.run_id, data=data, artifact_file=f"{name}_{self._step}.json")

    def summary(self, values: dict[str, float]) -> None:
        self._log_metrics({f"summary/{key}": value for key, value in values.items()}, self._step)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


@register("trackio", "trackio")
class TrackioTracker:
    """A trackio run, resumed by its name (``resume="allow"``): local SQLite in ``TRACKIO_DIR``,
    which trackio reads once when first imported, so this sets it to ``results_root/trackio``
    unless the user set it; online when ``TRACKIO_SPACE_ID`` or ``TRACKIO_SERVER_URL`` is set.
    Scalars at their step; tables as ``trackio.Table`` at the last step logged; the summary as
    ``summary/<key>`` values logged at that step (trackio has no separate summary). trackio keeps
    one current run per process: ``close`` finishes it (``trackio.finish``), and a cell whose
    trackio failed has its run finished by the next ``trackio.init``. Tags are not sent: trackio
    has none."""

    def __init__(self, run: TrackerRun):
        os.environ.setdefault("TRACKIO_DIR", str(run.results_root / "trackio"))
        import trackio

        self._trackio = trackio
        self._step = run.resume_step or 0
        self._run = trackio.init(
            project=run.project, name=run.name, group=run.group or None, config=run.config, resume="allow"
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log({key: float(value) for key, value in scalars.items()}, step=step)
        self._step = max(self._step, step)

    def table(self, name: str, rows: list[dict]) -> None:
        columns = _columns(rows)
        table = self._trackio.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self._run.log({name: table}, step=self._step)

    def summary(self, values: dict[str, float]) -> None:
        self._run.log({f"summary/{key}": float(value) for key, value in values.items()}, step=self._step)

    def close(self) -> None:
        self._trackio.finish()
