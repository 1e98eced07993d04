"""The task registry: each task module registers its ``TaskSpec`` beside its own code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from bench.core.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """A model a cell of the task holds in memory, described by its published config (no weights):
    ``bench plan`` builds it on the meta device to count parameters and size activations."""

    role: str  # "policy" (trained), "reference" (frozen copy of the policy) or "reward" (frozen)
    config: dict  # a transformers config as in its config.json (``model_type`` and the sizes)
    name: str = ""  # what it is, for the plan's table (a Hub id or a preset name)


@dataclass(frozen=True)
class Setting:
    """One setting a published protocol fixes: its value as the source has it, where, and the bench
    config key that holds bench's value (read from the task's default config of ``method``, so a
    table built from these cannot drift from the code). Bench follows the source when that value,
    written as ``bench protocols`` writes it, equals ``value`` (default: ``published``); ``departs``
    says why it differs where it does on purpose, ``bench`` what it does where no key holds it."""

    what: str
    published: str
    source: str
    key: str = ""
    method: str = ""  # the method whose default config holds ``key`` ("": the task's first method)
    value: str = ""
    departs: str = ""
    bench: str = ""


@dataclass(frozen=True)
class PaperProtocol:
    """The named protocol a paper task's defaults follow: the source (code at a commit, or a paper)
    and its settings, shown by ``bench protocols`` and in the README."""

    name: str
    source: str
    settings: tuple[Setting, ...]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its config dataclass, how to build it, and what it needs to run."""

    name: str
    config_cls: type
    builder: Callable[[object], object]  # task config -> the task object its loop trains on
    trainer: str  # the training loop that runs it: "linear" (explicit policy), "lm" or "rm"
    needs: str
    description: str
    # key=value overrides of the generic defaults; "SCOPE:key=value" applies only to the methods whose
    # name or aggregator is SCOPE (e.g. "chi2:method.rho=0.5": chi-square radii, not TV's)
    defaults: tuple[str, ...] = ()
    losses: frozenset[str] = frozenset({"rebel", "dpo", "ipo"})
    size_key: str = ""  # the config key that sweeps' "sizes" axis sets (model size)
    scale_key: str = "task.n"  # the config key of the "scales" axis (data scale)
    preparer: Callable[[object], str] | None = None  # run by `bench prepare TASK` (SFT, reward model)
    gpus: int = 0  # GPUs one cell asks for by default (the paper tasks: 1); CPU-only tasks: 0
    models: Callable[[object], list[ModelSpec]] | None = None  # what a cell holds, for `bench plan`
    protocol: PaperProtocol | None = None  # the published protocol its defaults follow

    def defaults_for(self, method: str, aggregator: str) -> list[str]:
        """The task's default overrides that apply to ``method`` (scoped ones only to their scope)."""
        out = []
        for entry in self.defaults:
            head, _, rest = entry.partition("=")
            scope, colon, key = head.rpartition(":")
            if not colon:
                out.append(entry)
            elif scope in (method, aggregator):
                out.append(f"{key}={rest}")
        return out

    def build(self, task_cfg: DictConfig | object) -> object:
        cfg = OmegaConf.to_object(task_cfg) if isinstance(task_cfg, DictConfig) else task_cfg
        return self.builder(cfg)

    def prepare(self, task_cfg: DictConfig) -> str:
        if self.preparer is None:
            raise ValueError(f"task {self.name} has nothing to prepare")
        return self.preparer(OmegaConf.to_object(task_cfg))

    def model_specs(self, task_cfg: DictConfig | object) -> list[ModelSpec]:
        if self.models is None:
            return []
        cfg = OmegaConf.to_object(task_cfg) if isinstance(task_cfg, DictConfig) else task_cfg
        return self.models(cfg)

    def validate(self, task_cfg: DictConfig) -> None:
        cfg = OmegaConf.to_object(task_cfg)
        if hasattr(cfg, "validate"):
            cfg.validate()


TASKS: Registry[TaskSpec] = Registry("task")


def register_task(spec: TaskSpec) -> TaskSpec:
    return TASKS.add(spec.name, spec)
