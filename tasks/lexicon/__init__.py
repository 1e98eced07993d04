"""The offline lexicon task: the embedded default, real on a laptop CPU with no network.

Prompts are the project's sentence starters (``prompts.py``); the reward panel is 10 NRC emotion
categories plus VADER sentiment (``rewards.py``); the training mixture blends two seen objectives
(like the Emotion task's alpha0 mix of two emotions) and the held-out test mixtures include every
unseen objective. Model sizes are policy presets (``presets.py``); data scale is ``n``, the size of
the training prompt pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.core.lm import Sampling
from tasks.lexicon import presets, rewards
from tasks.lexicon.prompts import Prompt, splits
from tasks.mixtures import Mixture, Protocol, pair_protocol
from tasks.registry import ModelSpec, TaskSpec, register_task
from tasks.reward_model import LearnedReward
from tasks.shapes import config_of, policy_and_reference


@dataclass
class LexiconConfig:
    policy: str = "tiny"  # model size: tiny | small | smollm2
    n: int = 200  # training prompt pool ("data scale")
    n_val: int = 40
    n_test: int = 60
    seen: list[str] = field(default_factory=lambda: ["joy", "trust"])
    alpha0: float = 0.5
    protocol: str = "fixed"  # fixed | random_pair (a random ordered pair of seen objectives per prompt)
    mixing: str = "convex"  # convex (on standardized heads) | geometric (on raw heads in [0, 1])
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    pretrain_steps: int = 0  # 0: the preset's own
    reward_model: str = ""  # a trained reward model folder: train on its score, evaluate on the true heads

    def validate(self) -> None:
        if self.policy not in presets.NAMES:
            raise ValueError(f"task.policy {self.policy!r} is unknown; known: {', '.join(presets.NAMES)}")
        unknown = [s for s in self.seen if s not in rewards.HEADS]
        if unknown or len(self.seen) < 2:
            raise ValueError(
                f"task.seen needs two or more of {', '.join(rewards.HEADS)}; got {list(self.seen)}"
            )
        if self.protocol not in ("fixed", "random_pair") or self.mixing not in ("convex", "geometric"):
            raise ValueError("task.protocol is fixed|random_pair and task.mixing is convex|geometric")
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                "task.n and task.max_new_tokens must be >= 1, task.temperature > 0, 0 < task.top_p <= 1"
            )


class LexiconTask:
    def __init__(self, cfg: LexiconConfig):
        cfg.validate()
        self.cfg = cfg
        self.names = list(rewards.HEADS)
        parts = splits(cfg.n_val, cfg.n_test)
        if cfg.n > len(parts["train"]):
            raise ValueError(f"task.n = {cfg.n} exceeds the {len(parts['train'])} training prompts")
        self.splits: dict[str, list[Prompt]] = {**parts, "train": parts["train"][: cfg.n]}
        seen = tuple(self.names.index(s) for s in cfg.seen)
        self.protocol = pair_protocol(self.names, seen, cfg.alpha0, cfg.mixing, cfg.protocol == "random_pair")
        self.sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        self.standardize = cfg.mixing == "convex"
        self.learned = None
        if cfg.reward_model:
            self.learned = LearnedReward(cfg.reward_model)
            self.names.append("learned_rm")
            self.protocol = with_learned_head(self.protocol)

    @property
    def reward_fingerprint(self) -> str:
        """The learned reward model's weights ("" without one): its folder can be trained again,
        so the reference cache keys on what it holds, not on its path alone."""
        return self.learned.fingerprint if self.learned else ""

    def prompts(self, split: str) -> list[Prompt]:
        return self.splits[split]

    def load_policy(self):
        return presets.load_policy(self.cfg.policy, self.cfg.pretrain_steps)

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """Raw head scores ``[N, K]`` of the responses (the lexicon heads ignore the prompt), plus the
        learned reward model's score of prompt + response when one is configured."""
        heads = rewards.score(responses)
        if self.learned is None:
            return heads
        return torch.cat([heads, self.learned.score(prompts, responses)], 1)


def with_learned_head(protocol: Protocol) -> Protocol:
    """Train on the learned reward alone; evaluate the same mixtures of the true heads as before."""

    def pad(m: Mixture, w: float = 0.0) -> Mixture:
        return Mixture(m.name, (*m.weights, w), m.kind)

    train = Mixture("learned_rm", (0.0,) * len(protocol.train.weights) + (1.0,), protocol.train.kind)
    return Protocol(
        train,
        tuple(map(pad, protocol.val)),
        tuple(map(pad, protocol.test)),
        protocol.seen,
        protocol.alpha0,
        False,
        (*protocol.names, "learned_rm"),
    )


def lexicon_models(cfg: LexiconConfig) -> list[ModelSpec]:
    """The policy preset (GPT-2 shapes of ``presets.PRESETS`` or SmolLM2's published config) and the
    learned reward model when one is configured."""
    if cfg.policy == "smollm2":
        models = policy_and_reference(presets.SMOLLM2_HUB)
    else:
        p = presets.PRESETS[cfg.policy]
        shape = {"model_type": "gpt2", "vocab_size": p.vocab, "n_positions": 256}
        shape |= {"n_layer": p.n_layer, "n_embd": p.n_embd, "n_head": p.n_head}
        models = [ModelSpec("policy", shape, cfg.policy), ModelSpec("reference", shape, cfg.policy)]
    if cfg.reward_model:
        models.append(ModelSpec("reward", config_of(cfg.reward_model) | {"num_labels": 1}, cfg.reward_model))
    return models


register_task(
    TaskSpec(
        name="lexicon",
        config_cls=LexiconConfig,
        builder=LexiconTask,
        trainer="lm",
        needs="nothing: offline, CPU (nrclex + vaderSentiment lexicons, presets built once into the cache)",
        size_key="task.policy",
        models=lexicon_models,
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
