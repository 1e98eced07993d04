"""Tasks: prompt (context) sources, reward panels of K named objectives, mixture protocols.

``tasks.names()`` lists the registered tasks and ``tasks.get(name)`` returns a ``TaskSpec``.
Nothing here knows which method runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from bench.registry import Registry
from tasks.lexicon import LexiconConfig
from tasks.linear import LinearConfig


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its config dataclass, how to build it, and what it needs to run."""

    name: str
    config_cls: type
    builder: str  # "module:attr", imported lazily so listing tasks stays cheap
    trainer: str  # the training loop that runs it: "linear" (explicit policy) or "lm"
    needs: str
    description: str
    defaults: tuple[str, ...] = ()  # key=value overrides of the generic defaults
    losses: frozenset[str] = frozenset({"rebel", "dpo", "ipo"})
    size_key: str = ""  # the config key that sweeps' "sizes" axis sets (model size)
    scale_key: str = "task.n"  # the config key of the "scales" axis (data scale)

    def build(self, task_cfg: DictConfig | object) -> object:
        module, attr = self.builder.split(":")
        factory: Callable = getattr(importlib.import_module(module), attr)
        cfg = OmegaConf.to_object(task_cfg) if isinstance(task_cfg, DictConfig) else task_cfg
        return factory(cfg)

    def validate(self, task_cfg: DictConfig) -> None:
        cfg = OmegaConf.to_object(task_cfg)
        if hasattr(cfg, "validate"):
            cfg.validate()


TASKS: Registry[TaskSpec] = Registry("task")


def register_task(spec: TaskSpec) -> TaskSpec:
    return TASKS.add(spec.name, spec)


def names() -> list[str]:
    return TASKS.names()


def get(name: str) -> TaskSpec:
    return TASKS.get(name)


register_task(
    TaskSpec(
        name="linear",
        config_cls=LinearConfig,
        builder="tasks.linear:LinearTask",
        trainer="linear",
        needs="nothing: exact, CPU, seconds",
        size_key="task.d",
        description="log-linear policy, K linear objectives, exact expected rewards and KL",
        defaults=(
            "method.eta=1.0",
            "method.beta=1.0",
            "train.iterations=150",
            "train.batch_size=64",
            "train.lr=0.05",
            "train.eval_every=25",
            "train.grad_clip=0",
        ),
    )
)

register_task(
    TaskSpec(
        name="lexicon",
        config_cls=LexiconConfig,
        builder="tasks.lexicon:LexiconTask",
        trainer="lm",
        needs="nothing: offline, CPU (nrclex + vaderSentiment lexicons, presets built once into the cache)",
        size_key="task.policy",
        description="sentence starters; 10 NRC emotion heads + VADER; tiny GPT-2 / SmolLM2 policies",
        defaults=(
            "method.eta=0.1",
            "method.beta=0.1",
            "train.iterations=40",
            "train.batch_size=16",
            "train.lr=1e-3",
            "train.eval_every=20",
        ),
    )
)
