"""Optuna radius tuning: maximize the validation worst-case reward of a method on a task.

The search space is the method's radius knob (log scale over its declared range) plus, optionally,
other hyperparameters from a search-space file in ``sweeps/``::

    params:
      train.lr: {low: 1.0e-4, high: 1.0e-1, log: true}
      method.labels: {choices: [bernoulli, soft]}

Each key is checked against the config before anything runs. With ``--strength`` the loss's
regularization strength (DPO's beta, REBEL's eta) is searched too, log scale over a decade either
side of its configured value; a method without a radius (DPO, REBEL) then tunes its strength alone.
``--methods all --strength`` is the equal tuning budget: one study per method, each with the same
number of trials, seed and pruner, run side by side.

Each trial trains one cell (seed ``--tune-seed``) with its record under
``results/tune/<study>/trials/`` (never in the leaderboard's folders) and reports the validation
worst case after every evaluation, so a pruner can stop hopeless trials. Test mixtures are never
seen while tuning. Studies live in SQLite under ``results/tune/`` by default, in a journal file
(``--storage journal``, for many SLURM workers on NFS) or an RDB URL.

Any number of workers may share a study (``--workers W`` submitit jobs, or further ``bench tune``
runs joining it): each claims one trial at a time under the study's file lock, and only while the
trials that count (complete, pruned or failed) plus those running or queued are fewer than the
budget, so the study ends with exactly the budget whatever the interleaving; each worker's sampler
is seeded by its order of joining. A running trial carries its worker (``host:pid``) and a heartbeat
stamped every ``HEARTBEAT_S`` seconds. Another worker takes it for interrupted only when its worker
is provably gone (the process has exited on this host, or the heartbeat is older than ``GRACE_S``):
it is marked failed (``interrupted``, not counted) and its parameters are enqueued again, once. A
re-run thus resumes the study and runs only the missing trials. Optuna's own heartbeat is not used:
in Optuna 5 it exists for RDB storages only, runs only inside ``Study.optimize`` (which claims
trials without a budget check), and takes a killed worker's trial for live until its grace period
ends.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

import methods
from bench.core.artifacts import locked
from bench.harness.records import read_json
from bench.harness.runner import Cell, is_completed, record_path, run_cell
from bench.loops.callbacks import StopRun
from bench.loops.config import ConfigError, build_config

OBJECTIVE = "val_worst_case"
STRENGTH_SPREAD = 10.0  # the strength's search range: configured value / spread to value * spread
SQLITE_WAIT_S = 60  # how long a SQLite write waits for another worker's lock
HEARTBEAT_S = 10  # a running trial's worker stamps its heartbeat this often
GRACE_S = 180  # a running trial whose heartbeat is older belongs to a dead worker (> SQLITE_WAIT_S)
POLL_S = 2.0  # how often a worker with nothing to claim looks again for finished or dead trials
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STORAGES = "sqlite, journal, journal:PATH or an RDB URL sqlalchemy can open (postgresql://user@host/db)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneSpec:
    """Everything a worker needs (picklable): what to tune, where the study lives."""

    task: str
    method: str
    study: str
    storage: str
    results: str
    overrides: tuple[str, ...] = ()
    space: tuple[tuple[str, tuple], ...] = ()  # (key, ("float", low, high, log) | ("choice", values))
    pruner: str = "median"
    seed: int = 0  # the training seed of every trial

    @property
    def folder(self) -> Path:
        return Path(self.results) / "tune" / self.study


def storage_url(spec: str, results: Path, study: str) -> str:
    """``sqlite`` (default), ``journal`` or ``journal:PATH``, or an RDB URL; anything else is a
    ``ConfigError`` naming ``--storage``."""
    tune_dir = (Path(results) / "tune").resolve()
    if spec in ("", "sqlite"):
        return f"sqlite:///{tune_dir / study}.db"
    if spec == "journal":
        return f"journal:{tune_dir / study}.journal"
    if spec.startswith("journal:") and spec != "journal:":
        return spec
    check_rdb_url(spec)
    return spec


def dashboard_command(url: str) -> str:
    """The ``optuna-dashboard`` command that opens the study at storage ``url`` (a journal file is
    given by its path, which the dashboard recognizes by its content)."""
    import shlex

    return f"optuna-dashboard {shlex.quote(url.removeprefix('journal:'))}"


def check_rdb_url(url: str) -> None:
    """Raise ``ConfigError`` unless sqlalchemy has a dialect and driver for ``url`` (nothing connects)."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(url).dispose()
    except (sqlalchemy.exc.ArgumentError, ImportError) as err:
        raise ConfigError(f"--storage {url!r}: {str(err).splitlines()[0]}; use {STORAGES}") from None


def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        # Opening a new SQLite study creates its schema (tables, alembic stamp); two processes doing
        # that at once fail (``table studies already exists``, ``UNIQUE constraint failed:
        # alembic_version``). A file lock makes the first open create it and the others find it.
        path = Path(url[len("sqlite:///") :])
        with locked(path):
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT_S}})
    return url


def load_space(path: Path | None) -> tuple[tuple[str, tuple], ...]:
    """The optional search-space file as ``(key, spec)`` pairs, validated."""
    if path is None:
        return ()
    raw = OmegaConf.to_container(OmegaConf.load(path))
    unknown = set(raw) - {"params"}
    if unknown:
        raise ConfigError(f"search space {path}: unknown keys {sorted(unknown)}; known: params")
    out = []
    for key, spec in (raw.get("params") or {}).items():
        if "choices" in spec and set(spec) == {"choices"} and spec["choices"]:
            out.append((key, ("choice", tuple(spec["choices"]))))
        elif {"low", "high"} <= set(spec) <= {"low", "high", "log"} and float(spec["low"]) < float(
            spec["high"]
        ):
            out.append(
                (key, ("float", float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))))
            )
        else:
            raise ConfigError(f"search space {path}: params.{key} needs {{low, high[, log]}} or {{choices}}")
    return tuple(out)


def check_space(
    space: tuple[tuple[str, tuple], ...], path: Path | None, task: str, method: str, seed: int
) -> None:
    """Refuse a search-space key or value that ``method``'s config does not take (a typo such as
    ``train.lrr``), naming the file and the key: each choice and both ends of each range are built
    into the config."""
    for key, dist in space:
        for value in dist[1] if dist[0] == "choice" else dist[1:3]:
            try:
                build_config(task, method, [f"{key}={value}"], seed)
            except ConfigError as err:
                raise ConfigError(f"search space {path}: params.{key}: {err}") from None


def strength_space(method: str, configured: dict) -> tuple[tuple[str, tuple], ...]:
    """The search range of ``method``'s regularization strength around its configured value
    (``configured`` is the config's ``method`` section); empty for a loss without one."""
    name = methods.get(method).strength
    if name is None:
        return ()
    value = float(configured[name])
    return ((f"method.{name}", ("float", value / STRENGTH_SPREAD, value * STRENGTH_SPREAD, True)),)


def make_study(spec: TuneSpec) -> optuna.Study:
    """Open the study, creating it on first use (a worker's sampler is seeded by ``join``)."""
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3)
        if spec.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        study_name=spec.study,
        storage=open_storage(spec.storage),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=spec.seed * 1000),
        pruner=pruner,
    )


def trial_cell(spec: TuneSpec, params: dict, seed: int | None = None, tags: tuple[str, ...] = ()) -> Cell:
    """The cell of a parameter set (the radius goes to the method's own knob)."""
    knob = methods.get(spec.method).knob
    extra = [f"method.{knob.name}={v}" if k == "radius" else f"{k}={v}" for k, v in params.items()]
    return Cell(spec.task, spec.method, spec.seed if seed is None else seed, (*spec.overrides, *extra), tags)


def objective(spec: TuneSpec, trial: optuna.Trial) -> float:
    knob = methods.get(spec.method).knob
    params = {"radius": trial.suggest_float("radius", knob.low, knob.high, log=knob.log)} if knob else {}
    for key, dist in spec.space:
        if dist[0] == "choice":
            params[key] = trial.suggest_categorical(key, list(dist[1]))
        else:
            params[key] = trial.suggest_float(key, dist[1], dist[2], log=dist[3])
    cell = trial_cell(spec, params)
    root = spec.folder / "trials"
    trial.set_user_attr("run_dir", str(cell.run_dir(root)))

    def report(iteration: int, scores: dict) -> None:
        trial.report(scores[OBJECTIVE], iteration)
        if trial.should_prune():
            raise StopRun(f"pruned at iteration {iteration}")

    if not is_completed(cell, root):
        try:
            run_cell(cell, root, on_eval=report, sweep=f"tune-{spec.study}")
        except StopRun:
            raise optuna.TrialPruned() from None
    rec = read_json(record_path(cell, root))
    if rec["status"] != "completed":
        trial.set_user_attr("error", f"{rec['error']['type']}: {rec['error']['message']}")
        raise RuntimeError(f"trial {trial.number} failed: {rec['error']['message']}")
    return float(rec["metrics"][OBJECTIVE])


def this_worker() -> str:
    """The ``worker`` user attr of the trials this process runs: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def worker_is_dead(trial: FrozenTrial, now: float) -> bool:
    """Whether a RUNNING trial's worker is provably gone: its process has exited on this host, or its
    heartbeat (its start, for a trial not yet stamped) is older than ``GRACE_S`` (hosts' clocks are
    taken to agree to well within that)."""
    beat = trial.user_attrs.get("heartbeat") or trial.datetime_start.timestamp()
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    same_host_gone = host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))
    return same_host_gone or now - beat > GRACE_S


def recover_dead(study: optuna.Study) -> int:
    """Mark the RUNNING trials of dead workers failed (``interrupted``) and enqueue their parameters
    again, once: an interrupted retry is not retried. Runs under the study's lock (``claim``)."""
    now, recovered = time.time(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not worker_is_dead(t, now):
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # its worker finished it after all
            continue
        if "retry_of" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        recovered += 1
    return recovered


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that used up budget: finished ones and failures that were not interruptions."""
    return [
        t
        for t in trials
        if t.state in FINISHED or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    ]


def study_lock(spec: TuneSpec) -> AbstractContextManager[None]:
    """The study's file lock, ``results/tune/<study>/claims.lock``: workers join the study, recover
    dead workers' trials and claim trials under it."""
    return locked(spec.folder / "claims")


def join(study: optuna.Study, spec: TuneSpec) -> optuna.samplers.TPESampler:
    """The sampler of a worker joining ``study``, seeded by how many workers joined before it: workers
    sharing the study draw different parameters, and a lone worker's draws are reproducible."""
    with study_lock(spec):
        joined = study.user_attrs.get("workers", 0)
        study.set_user_attr("workers", joined + 1)
    return optuna.samplers.TPESampler(seed=spec.seed * 1000 + joined)


def claim(study: optuna.Study, spec: TuneSpec, budget: int) -> optuna.Trial | None:
    """The next trial for this worker, or None once ``budget`` trials count. Under the study's lock:
    recover dead workers' trials, then take a queued retry, or start a new trial while the counted,
    running and queued trials are fewer than ``budget``. Otherwise other workers' trials could still
    use up the budget: wait until they finish or are found dead."""
    while True:
        with study_lock(spec):
            recover_dead(study)
            trials = study.get_trials(deepcopy=False)
            used = len(counted(trials))
            if used >= budget:
                return None
            states = [t.state for t in trials]
            if TrialState.WAITING in states or used + states.count(TrialState.RUNNING) < budget:
                return start_trial(study)
        time.sleep(POLL_S)


def start_trial(study: optuna.Study) -> optuna.Trial:
    """A new trial (a queued retry first), stamped with this worker and a first heartbeat."""
    trial = study.ask()
    trial.set_user_attr("worker", this_worker())
    trial.set_user_attr("heartbeat", time.time())
    return trial


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Stamp ``trial``'s ``heartbeat`` user attr every ``HEARTBEAT_S`` seconds while the block runs,
    so other workers see its worker alive; a failed stamp (a busy database) is retried next time."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                trial.set_user_attr("heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker took it over
                return
            except Exception as err:  # the next stamp may succeed; the grace period allows for it
                log.warning("trial %d: heartbeat not stamped: %s", trial.number, err)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trial(study: optuna.Study, spec: TuneSpec, trial: optuna.Trial) -> None:
    """Run a claimed trial under its heartbeat and tell the outcome: a crashing trial is failed (the
    error logged); one another worker took over meanwhile is left to that worker's retry."""
    value, state = None, TrialState.COMPLETE
    with heartbeat(trial):
        try:
            value = objective(spec, trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as err:
            state = TrialState.FAIL
            log.warning("trial %d of %s failed: %s", trial.number, spec.study, err)
    study.tell(trial, value, state=state, skip_if_finished=True)


def tune_worker(spec: TuneSpec, budget: int) -> int:
    """One worker (a submitit job's body): claim and run trials one at a time until ``budget``
    trials of the study count; returns how many it ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = make_study(spec)
    study.sampler = join(study, spec)
    ran = 0
    while (trial := claim(study, spec, budget)) is not None:
        run_trial(study, spec, trial)
        ran += 1
    return ran


def tune_group(workers: list[tuple[TuneSpec, int]]) -> list[tuple[str, int]]:
    """One job's workers ``(spec, budget)``, run in turn (several studies may share a job): each
    one's study and the trials it ran."""
    return [(spec.study, tune_worker(spec, budget)) for spec, budget in workers]


def trial_note(trial: FrozenTrial) -> str:
    """``interrupted``, a failed trial's error, or ``retry of N`` for a re-run interrupted trial."""
    if trial.user_attrs.get("interrupted"):
        return "interrupted"
    if "retry_of" in trial.user_attrs and "error" not in trial.user_attrs:
        return f"retry of {trial.user_attrs['retry_of']}"
    return trial.user_attrs.get("error", "")


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "radius": t.params.get("radius"),
                **{k: v for k, v in t.params.items() if k != "radius"},
                OBJECTIVE: t.value,
                "last_step": t.last_step,
                "seconds": t.duration.total_seconds() if t.duration else None,
                "note": trial_note(t),
            }
        )
    return pd.DataFrame(rows)


def plot_study(table: pd.DataFrame, axis: str, label: str, folder: Path) -> list[Path]:
    """Optimization history and objective against the ``axis`` column (log x), as PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    done = table[table.state == "COMPLETE"].sort_values("trial")
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.scatterplot(data=done, x="trial", y=OBJECTIVE, ax=ax, label="trial")
    ax.plot(done.trial, done[OBJECTIVE].cummax(), color="C1", drawstyle="steps-post", label="best so far")
    ax.set(xlabel="trial", ylabel="validation worst-case reward", title="optimization history")
    ax.legend()
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"history.{ext}", dpi=150)
        paths.append(folder / f"history.{ext}")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.scatterplot(data=done, x=axis, y=OBJECTIVE, hue="trial", palette="viridis", ax=ax)
    ax.set_xscale("log")
    ax.set(xlabel=label, ylabel="validation worst-case reward", title=f"objective vs {label}")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"objective_vs_radius.{ext}", dpi=150)
        paths.append(folder / f"objective_vs_radius.{ext}")
    plt.close(fig)
    return paths


@dataclass
class TuneResult:
    spec: TuneSpec
    study: optuna.Study
    table: pd.DataFrame
    best_params: dict | None  # None when no trial completed
    best_value: float
    recovered: int
    ran: int


def run_studies(
    specs: list[TuneSpec],
    trials: int,
    workers: int = 1,
    cluster: str = "debug",
    timeout_min: int = 240,
    slurm=None,
) -> list[TuneResult]:
    """Run (or resume) every study until ``trials`` trials of each count; up to ``workers`` jobs
    share each study (no more than it misses trials). Locally at most max(workers, cores) jobs run
    at once, on SLURM one per worker. Each study's ``trials.csv`` and plots are written, completed
    or not."""
    from bench.harness.launch import make_executor, usable_cores

    if trials < 1 or workers < 1:
        raise ConfigError("--trials and --workers must be >= 1")
    interrupted, shares = {}, []
    for spec in specs:
        existing = make_study(spec).get_trials(deepcopy=False)
        interrupted[spec.study] = n_interrupted(existing)
        shares += [(spec, trials)] * min(workers, trials - len(counted(existing)))
    done: list[tuple[str, int]] = []
    if shares and cluster == "debug":
        done = tune_group(shares)
    elif shares:
        n_jobs = len(shares) if cluster == "slurm" else min(len(shares), max(workers, usable_cores()))
        groups = [shares[i::n_jobs] for i in range(n_jobs)]
        folder = Path(specs[0].results) / "tune"
        executor = make_executor(cluster, folder, timeout_min, slurm, [trial_cell(specs[0], {})])
        for job in executor.map_array(tune_group, groups):
            done += job.result()
    ran = {spec.study: sum(n for study, n in done if study == spec.study) for spec in specs}
    return [_finished(spec, interrupted[spec.study], ran[spec.study]) for spec in specs]


def n_interrupted(trials: list[FrozenTrial]) -> int:
    """How many of ``trials`` were interrupted (their worker died) and re-queued."""
    return sum(bool(t.user_attrs.get("interrupted")) for t in trials)


def _finished(spec: TuneSpec, interrupted_before: int, ran: int) -> TuneResult:
    """The study's result; its ``trials.csv`` and plots are written (in turn, should several runs
    of one study end together)."""
    study = make_study(spec)
    trials = study.get_trials(deepcopy=False)
    recovered = n_interrupted(trials) - interrupted_before
    table = trials_table(study)
    with locked(spec.folder / "trials.csv"):
        table.to_csv(spec.folder / "trials.csv", index=False)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            return TuneResult(spec, study, table, None, math.nan, recovered, ran)
        knob = methods.get(spec.method).knob
        axis, label = ("radius", knob.name) if knob else (spec.space[0][0],) * 2
        plot_study(table, axis, label, spec.folder)
    best = study.best_trial
    return TuneResult(spec, study, table, dict(best.params), float(best.value), recovered, ran)


def at_edge(spec: TuneSpec, params: dict) -> list[str]:
    """The searched float parameters whose best value lies in the outer 2% (log scale where the
    search is) of their range: the optimum may be outside it, so the range should be widened."""
    knob = methods.get(spec.method).knob
    ranges = dict(spec.space)
    if knob:
        ranges["radius"] = ("float", knob.low, knob.high, knob.log)
    out = []
    for key, value in params.items():
        dist = ranges.get(key)
        if dist is None or dist[0] != "float":
            continue
        scale = math.log if dist[3] else float
        lo, hi, v = scale(dist[1]), scale(dist[2]), scale(value)
        if min(v - lo, hi - v) <= 0.02 * (hi - lo):
            out.append(knob.name if key == "radius" else key)
    return out


def tuning_tags(result: TuneResult, trials: int) -> tuple[str, ...]:
    """The tags of a tuned test cell: its study, the trial budget, and what was tuned (the
    leaderboard's ``tuned`` column reads them)."""
    knob = methods.get(result.spec.method).knob
    keys = [knob.name if k == "radius" else k.removeprefix("method.") for k in result.best_params]
    return (f"tuned:{result.spec.study}", f"tuning-budget:{trials}", f"tuned-keys:{','.join(keys)}")


def run_tuning(
    spec: TuneSpec, trials: int, workers: int = 1, cluster: str = "debug", timeout_min: int = 240, slurm=None
) -> TuneResult:
    """One study (``run_studies`` of one spec); raises when no trial completed."""
    result = run_studies([spec], trials, workers, cluster, timeout_min, slurm)[0]
    if result.best_params is None:
        raise RuntimeError(f"study {spec.study}: no trial completed; see {spec.folder / 'trials.csv'}")
    return result
