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
from tasks.armorm import ArmoRMConfig
from tasks.emotion import EmotionConfig
from tasks.hh import HHConfig
from tasks.lexicon import LexiconConfig
from tasks.linear import LinearConfig
from tasks.prefs import LexiconPrefsConfig, UnifiedFeedbackConfig


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
    preparer: str = ""  # "module:function" run by `bench prepare TASK` (SFT, reward model), if any

    def build(self, task_cfg: DictConfig | object) -> object:
        module, attr = self.builder.split(":")
        factory: Callable = getattr(importlib.import_module(module), attr)
        cfg = OmegaConf.to_object(task_cfg) if isinstance(task_cfg, DictConfig) else task_cfg
        return factory(cfg)

    def prepare(self, task_cfg: DictConfig) -> str:
        if not self.preparer:
            raise ValueError(f"task {self.name} has nothing to prepare")
        module, attr = self.preparer.split(":")
        return getattr(importlib.import_module(module), attr)(OmegaConf.to_object(task_cfg))

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

PAPER_DEFAULTS = (
    "train.iterations=100",
    "train.batch_size=64",
    "train.lr=1e-5",
    "train.eval_every=50",
    "train.checkpoint_every=10",
    "train.grad_clip=1.0",
    "train.warmup=10",
)
register_task(
    TaskSpec(
        name="emotion",
        config_cls=EmotionConfig,
        builder="tasks.emotion:build",
        trainer="lm",
        needs="dair-ai/emotion, gpt2[-medium|-large] (Hub or HF cache); `bench prepare emotion` once; a GPU",
        description="emotion texts' first words; SFT GPT-2 policy; GPT-2 emotion classifier (6 heads)",
        defaults=(*PAPER_DEFAULTS, "method.eta=0.01", "method.beta=0.1"),
        size_key="task.size",
        preparer="tasks.emotion:prepare",
    )
)
register_task(
    TaskSpec(
        name="armorm",
        config_cls=ArmoRMConfig,
        builder="tasks.armorm:build",
        trainer="lm",
        needs="nvidia/HelpSteer2, Llama-3.2-1B/3B-Instruct (gated), ArmoRM-Llama3-8B (remote code); GPUs",
        description="HelpSteer2 prompts; Llama-3.2 Instruct; ArmoRM 19 objectives + MoE score",
        defaults=(
            *PAPER_DEFAULTS,
            "train.batch_size=32",
            "train.iterations=200",
            "method.eta=0.01",
            "method.beta=1.0",
            "method.labels=argmax",
        ),
        size_key="task.size",
    )
)
register_task(
    TaskSpec(
        name="hh",
        config_cls=HHConfig,
        builder="tasks.hh:build",
        trainer="lm",
        needs="Anthropic/hh-rlhf, Pythia/GPT-2, helpful + harmless RMs (Hub); `bench prepare hh`; a GPU",
        description="HH-RLHF first human turns; SFT Pythia/GPT-2; helpful and harmless reward models",
        defaults=(*PAPER_DEFAULTS, "method.eta=0.01", "method.beta=0.1"),
        size_key="task.size",
        preparer="tasks.hh:prepare",
    )
)

RM_LOSSES = frozenset({"bt"})
register_task(
    TaskSpec(
        name="lexicon-prefs",
        config_cls=LexiconPrefsConfig,
        builder="tasks.prefs:build_lexicon_prefs",
        trainer="rm",
        needs="nothing: offline, CPU (pairs sampled once from the lexicon preset, cached)",
        description="reward models on lexicon-labeled pairs; ID = training mixture, OOD = other objectives",
        defaults=("train.iterations=100", "train.batch_size=32", "train.lr=5e-4", "train.eval_every=25"),
        losses=RM_LOSSES,
        scale_key="task.n",
    )
)
register_task(
    TaskSpec(
        name="unified-feedback",
        config_cls=UnifiedFeedbackConfig,
        builder="tasks.prefs:build_unified_feedback",
        trainer="rm",
        needs="llm-blender/Unified-Feedback and Anthropic/hh-rlhf (Hub); a GPU for real base models",
        description="reward models on Unified-Feedback; OOD accuracy on HH-RLHF pairs (and datasets you add)",
        defaults=("train.iterations=2000", "train.batch_size=64", "train.lr=1e-5", "train.eval_every=500"),
        losses=RM_LOSSES,
        scale_key="task.n",
        size_key="task.rm_base",
    )
)
