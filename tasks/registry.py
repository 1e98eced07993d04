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
class TaskSpec:
    """A registered task: its config dataclass, how to build it, and what it needs to run."""

    name: str
    config_cls: type
    builder: Callable[[object], object]  # task config -> the task object its loop trains on
    trainer: str  # the training loop that runs it: "linear" (explicit policy), "lm" or "rm"
    needs: str
    description: str
    defaults: tuple[str, ...] = ()  # key=value overrides of the generic defaults
    losses: frozenset[str] = frozenset({"rebel", "dpo", "ipo"})
    size_key: str = ""  # the config key that sweeps' "sizes" axis sets (model size)
    scale_key: str = "task.n"  # the config key of the "scales" axis (data scale)
    preparer: Callable[[object], str] | None = None  # run by `bench prepare TASK` (SFT, reward model)
    gpus: int = 0  # GPUs one cell asks for by default (the paper tasks: 1); CPU-only tasks: 0
    models: Callable[[object], list[ModelSpec]] | None = None  # what a cell holds, for `bench plan`

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
