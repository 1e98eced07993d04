"""Optuna radius tuning: maximize the validation worst-case reward of a method on a task.

The search space is the method's radius knob (log scale over its declared range) plus, optionally,
other hyperparameters from a search-space file in ``sweeps/``::

    params:
      train.lr: {low: 1.0e-4, high: 1.0e-1, log: true}
      method.labels: {choices: [bernoulli, soft]}

With ``--strength`` the loss's regularization strength (DPO's beta, REBEL's eta) is searched too,
log scale over a decade either side of its configured value; a method without a radius (DPO,
REBEL) then tunes its strength alone. ``--methods all --strength`` is the equal tuning budget: one
study per method, each with the same number of trials, seed and pruner, run side by side.

Each trial trains one cell (seed ``--tune-seed``) with its record under
``results/tune/<study>/trials/`` (never in the leaderboard's folders) and reports the validation
worst case after every evaluation, so a pruner can stop hopeless trials. Test mixtures are never
seen while tuning. Studies live in SQLite under ``results/tune/`` by default, in a journal file
(``--storage journal``, for many SLURM workers on NFS) or an RDB URL. ``--workers W`` runs W
submitit jobs on one study; the trial budget is split between them. A re-run resumes the study:
trials left RUNNING by dead workers are marked failed (``interrupted``) and their parameters
enqueued again, and only the missing trials are run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from omegaconf import OmegaConf
from optuna.trial import TrialState

import methods
from bench.core.artifacts import locked
from bench.harness.records import read_json
from bench.harness.runner import Cell, is_completed, record_path, run_cell
from bench.loops.callbacks import StopRun
from bench.loops.config import ConfigError

OBJECTIVE = "val_worst_case"
STRENGTH_SPREAD = 10.0  # the strength's search range: configured value / spread to value * spread
SQLITE_WAIT_S = 60  # how long a SQLite write waits for another worker's lock
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
    """``sqlite`` (default), ``journal`` or ``journal:PATH``, or any RDB URL."""
    tune_dir = (Path(results) / "tune").resolve()
    if spec in ("", "sqlite"):
        return f"sqlite:///{tune_dir / study}.db"
    if spec == "journal":
        return f"journal:{tune_dir / study}.journal"
    return spec


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


def strength_space(method: str, configured: dict) -> tuple[tuple[str, tuple], ...]:
    """The search range of ``method``'s regularization strength around its configured value
    (``configured`` is the config's ``method`` section); empty for a loss without one."""
    name = methods.get(method).strength
    if name is None:
        return ()
    value = float(configured[name])
    return ((f"method.{name}", ("float", value / STRENGTH_SPREAD, value * STRENGTH_SPREAD, True)),)


def make_study(spec: TuneSpec, worker: int = 0) -> optuna.Study:
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
        sampler=optuna.samplers.TPESampler(seed=spec.seed * 1000 + worker),
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
            run_cell(cell, root, on_eval=report)
        except StopRun:
            raise optuna.TrialPruned() from None
    rec = read_json(record_path(cell, root))
    if rec["status"] != "completed":
        trial.set_user_attr("error", f"{rec['error']['type']}: {rec['error']['message']}")
        raise RuntimeError(f"trial {trial.number} failed: {rec['error']['message']}")
    return float(rec["metrics"][OBJECTIVE])


def tune_worker(spec: TuneSpec, n_trials: int, worker: int = 0) -> int:
    """One worker's share of the budget (a submitit job's body); crashing trials are marked failed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = make_study(spec, worker)
    study.optimize(lambda t: objective(spec, t), n_trials=n_trials, catch=(Exception,))
    return n_trials


def tune_group(shares: list[tuple[TuneSpec, int, int]]) -> int:
    """One job's shares ``(spec, trials, worker)``, run in turn (several studies may share a job)."""
    return sum(tune_worker(spec, n, worker) for spec, n, worker in shares)


def counted(study: optuna.Study) -> list:
    """Trials that used up budget: finished ones and failures that were not interruptions."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in FINISHED or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    ]


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING (their worker died) as failed and enqueue their parameters again."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
    return len(stale)


def split_budget(remaining: int, workers: int) -> list[int]:
    """``remaining`` trials dealt to at most ``workers`` workers (no empty shares)."""
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    return [n for n in shares if n]


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
                "note": "interrupted" if t.user_attrs.get("interrupted") else t.user_attrs.get("error", ""),
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
    """Run (or resume) every study until ``trials`` trials of each have used up budget; ``workers``
    jobs share each study. Locally at most max(workers, cores) jobs run at once, on SLURM one per
    share. Each study's ``trials.csv`` and plots are written, completed or not."""
    from bench.harness.launch import make_executor, usable_cores

    if trials < 1 or workers < 1:
        raise ConfigError("--trials and --workers must be >= 1")
    recovered, remaining, shares = {}, {}, []
    for spec in specs:
        study = make_study(spec)
        recovered[spec.study] = recover_interrupted(study)
        remaining[spec.study] = max(0, trials - len(counted(study)))
        shares += [(spec, n, i) for i, n in enumerate(split_budget(remaining[spec.study], workers))]
    if shares and cluster == "debug":
        tune_group(shares)
    elif shares:
        n_jobs = len(shares) if cluster == "slurm" else min(len(shares), max(workers, usable_cores()))
        groups = [shares[i::n_jobs] for i in range(n_jobs)]
        folder = Path(specs[0].results) / "tune"
        executor = make_executor(cluster, folder, timeout_min, slurm, [trial_cell(specs[0], {})])
        for job in executor.map_array(tune_group, groups):
            job.result()
    return [_finished(spec, recovered[spec.study], remaining[spec.study]) for spec in specs]


def _finished(spec: TuneSpec, recovered: int, ran: int) -> TuneResult:
    study = make_study(spec)
    table = trials_table(study)
    spec.folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(spec.folder / "trials.csv", index=False)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
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
