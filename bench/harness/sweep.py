"""Sweeps: YAML grids of methods x radii x model sizes x data scales x seeds, expanded to cells.

A sweep file (``sweeps/NAME.yaml``)::

    task: linear
    methods: [rebel, chi2-rebel, w-rebel]   # or: all
    seeds: [0, 1, 2]
    radii:                                   # per method, on the method's own radius knob;
      chi2-rebel: [0.01, 0.1, 1.0]           # "*" applies to every robust method without its own
    sizes: [4, 8]                            # the task's model-size key (linear: task.d)
    scales: [256, 1024]                      # the task's data-scale key (task.n)
    grid: {task.noise: [0.1, 0.5]}           # any other config key
    overrides: [train.iterations=100]
    slurm: {partition: gpu, gpus_per_task: 1, time_min: 240}

Everything is validated before anything runs or is submitted; errors name the offending key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import methods
import tasks
from bench.core.registry import UnknownNameError
from bench.harness.runner import Cell
from bench.loops.config import MAX_SEEDS, ConfigError, check_seed, method_key_users

SWEEP_DIR = Path(__file__).resolve().parents[2] / "sweeps"


@dataclass
class SlurmConfig:
    """Resources of each array task and how the array is shaped (see the README's sbatch block).

    The resources left at None are sized from the cells' task by ``bench.harness.plan``
    (the paper tasks: one GPU, host memory and time from the model; lexicon and linear: CPU)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    tasks_per_node: int | None = None  # the ranks of a train.nproc cell (one task per rank)
    gpu_mem_gb: float = 80.0  # memory of the GPUs the partition gives: cells that cannot fit are refused
    array_limit: int = 1000  # the cluster's MaxArraySize: larger sweeps become several arrays
    max_running: int = 64  # array tasks running at once (%N)
    signal_delay_s: int = 90  # USR2 this long before the time limit: checkpoint and requeue
    max_timeouts: int = 3  # requeues after hitting the time limit
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, ...)
    extra: dict[str, str] = field(default_factory=dict)  # further sbatch flags, e.g. {constraint: a100}
    offline: bool = True  # export HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for air-gapped nodes
    hf_home: str | None = None
    cache_dir: str | None = None  # BENCH_CACHE_DIR on the nodes (presets, converted models)


@dataclass
class SweepConfig:
    task: str = "lexicon"
    methods: list[str] = field(default_factory=lambda: ["all"])
    seeds: list[int] = field(default_factory=lambda: [0])
    radii: dict[str, list[float]] = field(default_factory=dict)
    sizes: list[str] = field(default_factory=list)
    scales: list[int] = field(default_factory=list)
    grid: dict[str, list[str]] = field(default_factory=dict)  # any further config key -> its values
    overrides: list[str] = field(default_factory=list)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Sweep:
    name: str
    config: SweepConfig
    cells: list[Cell]

    def folder(self, root: Path) -> Path:
        return Path(root) / ".sweeps" / self.name


def resolve_path(name: str) -> Path:
    """A sweep name (``smoke`` -> ``sweeps/smoke.yaml``) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = SWEEP_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no sweep {name!r}: not a YAML file and not one of {', '.join(known)}")


def load_sweep_config(path: Path) -> SweepConfig:
    """A sweep file's config; unreadable YAML, a top level that is not a mapping naming the task,
    unknown keys, wrong types and empty axes raise ``ConfigError`` naming the file."""
    raw = read_mapping(path, f"sweep {path}")
    if not raw:
        raise ConfigError(
            f"sweep {path} is empty: a sweep names at least its task ({', '.join(tasks.names())})"
        )
    if "task" not in raw:
        raise ConfigError(f"sweep {path} has no task key: name one of {', '.join(tasks.names())}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SweepConfig), raw)
    except OmegaConfBaseException as err:
        raise ConfigError(f"sweep {path}: {_first_line(err)}") from None
    for axis in ("methods", "seeds", "sizes", "scales"):
        if axis in raw and not raw[axis]:
            raise ConfigError(f"sweep {path}: axis {axis!r} is empty")
    return OmegaConf.to_object(cfg)


def read_mapping(path: Path, where: str) -> DictConfig:
    """A YAML file whose top level is a mapping, loaded as OmegaConf does (its safe loader: no
    Python tags, a cap on alias expansion); anything else raises a one-line ``ConfigError``."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if node is not None and not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the scalar {node.value!r}"
            raise ConfigError(f"{where}: the top level must be a mapping of keys to values, got {kind}")
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: invalid YAML: {_yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read it as UTF-8 text: {err}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return str(err).splitlines()[0]
    what = ": ".join(p.splitlines()[0] for p in (err.context, err.problem) if p)
    mark = err.problem_mark or err.context_mark
    return what + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def _first_line(err: Exception) -> str:
    lines = str(err).splitlines()
    key = next((ln.strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    return f"{lines[0]} ({key})" if key else lines[0]


def method_names(task: str, requested: list[str], where: str) -> list[str]:
    """``["all"]`` as every registered method whose loss ``task`` trains, else the names checked."""
    try:
        spec = tasks.get(task)
        for n in requested if requested != ["all"] else []:
            methods.get(n)
    except UnknownNameError as err:
        raise ConfigError(f"{where}: {err}") from None
    if requested == ["all"]:
        return [n for n in methods.names() if methods.get(n).loss in spec.losses]
    return list(dict.fromkeys(requested))  # a method named twice is one method


def expand(cfg: SweepConfig, name: str) -> Sweep:
    """Validate every axis and expand the grid into cells (each config built once to check it)."""
    where = f"sweep {name}"
    for axis in ("methods", "seeds"):
        if not getattr(cfg, axis):
            raise ConfigError(f"{where}: axis {axis!r} is empty")
    names = method_names(cfg.task, cfg.methods, where)
    spec = tasks.get(cfg.task)
    if cfg.sizes and not spec.size_key:
        raise ConfigError(f"{where}: task {cfg.task!r} has no model-size axis")
    _check_seeds(cfg.seeds, where)
    _check_radii(cfg.radii, names, where)
    for key, values in cfg.grid.items():
        if not values:
            raise ConfigError(f"{where}: grid.{key} is empty")
    _check_distinct(cfg, names, where)
    _check_method_keys([o.partition("=")[0].strip() for o in cfg.overrides] + list(cfg.grid), names, where)
    grid = [[f"{key}={v}" for v in values] for key, values in cfg.grid.items()]
    cells = []
    for method in names:
        knob = methods.get(method).knob
        radii = cfg.radii.get(method) or (cfg.radii.get("*") if knob else None) or [None]
        for radius, size, scale, point, seed in itertools.product(
            radii, cfg.sizes or [None], cfg.scales or [None], itertools.product(*grid), cfg.seeds
        ):
            extra = [*cfg.overrides, *point]
            if radius is not None:
                extra.append(f"method.{knob.name}={radius}")
            if size is not None:
                extra.append(f"{spec.size_key}={size}")
            if scale is not None:
                extra.append(f"{spec.scale_key}={scale}")
            cell = Cell(cfg.task, method, int(seed), tuple(extra))
            try:
                cell.config()
            except (ConfigError, ValueError) as err:
                raise ConfigError(f"{where}: cell {cell.label()}: {err}") from None
            cells.append(cell)
    return Sweep(name, cfg, cells)


def _check_seeds(seeds: list[int], where: str) -> None:
    """At most ``MAX_SEEDS`` seeds, each an integer in ``[0, 2**32)``."""
    if len(seeds) > MAX_SEEDS:
        raise ConfigError(f"{where}: {len(seeds)} seeds; at most {MAX_SEEDS} per run")
    for seed in seeds:
        check_seed(seed, f"{where}: seed")


def _check_radii(radii: dict[str, list[float]], names: list[str], where: str) -> None:
    """``radii`` keys are robust methods of the sweep (or ``*``, when one is), with values."""
    for key, values in radii.items():
        if key != "*" and key not in names:
            raise ConfigError(
                f"{where}: radii.{key} names a method that is not in the sweep ({', '.join(names)})"
            )
        if not values:
            raise ConfigError(f"{where}: radii.{key} is empty")
        if key != "*" and methods.get(key).knob is None:
            raise ConfigError(f"{where}: radii.{key}: {key} has no radius knob")
    if "*" in radii and not any(methods.get(n).knob for n in names):
        robust = ", ".join(n for n in methods.names() if methods.get(n).knob)
        raise ConfigError(
            f"{where}: radii.* (--radii): none of {', '.join(names)} has a radius knob; "
            f"robust methods: {robust}"
        )


def _check_distinct(cfg: SweepConfig, names: list[str], where: str) -> None:
    """No value twice on an axis: it would make the same cell twice."""
    axes = {"seeds": cfg.seeds, "sizes": cfg.sizes, "scales": cfg.scales}  # methods are merged
    axes |= {f"radii.{k}": v for k, v in cfg.radii.items()} | {f"grid.{k}": v for k, v in cfg.grid.items()}
    for axis, values in axes.items():
        twice = sorted(str(v) for v, count in Counter(values).items() if count > 1)
        if twice:
            raise ConfigError(f"{where}: {axis} lists {', '.join(twice)} more than once")


def _check_method_keys(keys: list[str], names: list[str], where: str) -> None:
    """Each ``method.<key>`` set for the whole sweep is read by at least one of its methods: a radius
    knob, ``eta`` or ``beta`` that none reads would only change the config hash. (``--radii`` sets
    each robust method's own knob, and in a multi-method sweep a key some methods read is allowed.)"""
    for key in keys:
        section, _, name = key.partition(".")
        users = method_key_users(name) if section == "method" else None
        if users is not None and not set(users) & set(names):
            raise ConfigError(
                f"{where}: {key}: no method of the run ({', '.join(names)}) has it; "
                f"methods with it: {', '.join(users)}"
            )


def load_sweep(name: str) -> Sweep:
    path = resolve_path(name)
    return expand(load_sweep_config(path), path.stem)


def adhoc_name(cells: list[Cell]) -> str:
    """A stable name for a sweep given on the command line: the hash of its cells."""
    payload = json.dumps([[c.task, c.method, c.seed, list(c.overrides)] for c in cells], sort_keys=True)
    return "adhoc-" + hashlib.sha256(payload.encode()).hexdigest()[:10]
