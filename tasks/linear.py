"""A synthetic preference-alignment task with exact answers: log-linear policies, linear rewards.

Contexts x carry feature maps ``phi(x, a)`` over A actions (drawn from G clusters of unequal size,
the groups); the policy is ``pi_theta(a|x) ∝ exp(theta·phi(x, a))`` and the K objectives are
``r_k(x, a) = w_k·phi(x, a)``. Because the policy is explicit, expected rewards under any mixture,
KL to the reference and parameter errors are computed exactly, never sampled. ``d`` plays the
role of model size and ``n`` (training contexts) of data scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tasks.mixtures import Protocol, pair_protocol
from tasks.registry import TaskSpec, register_task


@dataclass
class LinearConfig:
    d: int = 8  # feature dimension ("model size")
    n: int = 512  # training contexts ("data scale")
    n_val: int = 256
    n_test: int = 512
    actions: int = 16
    objectives: int = 4
    groups: int = 3  # context clusters with shares ∝ 2^-g (GR-DPO's groups)
    noise: float = 0.1  # std of the Gaussian noise on observed rewards
    alpha0: float = 0.8
    seen: list[int] = field(default_factory=lambda: [0, 1])
    ref_scale: float = 0.5  # norm of the reference parameter
    instance: int = 0  # seed of the problem instance (shared by all training seeds)

    def validate(self) -> None:
        for key in ("d", "n", "n_val", "n_test", "actions", "objectives", "groups"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.{key} must be >= 1, got {getattr(self, key)}")
        if self.actions < 2:
            raise ValueError("task.actions must be >= 2 (pairs of distinct samples)")
        if self.noise < 0 or self.ref_scale < 0:
            raise ValueError("task.noise and task.ref_scale must be >= 0")
        if len(self.seen) != 2:
            raise ValueError(f"task.seen must name two objectives, got {list(self.seen)}")


@dataclass
class Split:
    phi: Tensor  # [N, A, d]
    groups: Tensor  # [N]


class LinearTask:
    """One problem instance, fully determined by the config (``instance`` seeds it)."""

    def __init__(self, cfg: LinearConfig):
        cfg.validate()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(1_000_003 * (cfg.instance + 1))
        d, k = cfg.d, cfg.objectives
        self.objectives = torch.nn.functional.normalize(
            torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1
        )
        self.names = [f"obj{j}" for j in range(k)]
        self.cluster_means = torch.randn(cfg.groups, d, generator=gen, dtype=torch.float64)
        shares = torch.tensor([2.0**-g for g in range(cfg.groups)], dtype=torch.float64)
        self.group_shares = shares / shares.sum()
        self.theta_ref = cfg.ref_scale * torch.nn.functional.normalize(
            torch.randn(d, generator=gen, dtype=torch.float64), dim=0
        )
        self.train = self._contexts(cfg.n, gen)
        self.val = self._contexts(cfg.n_val, gen)
        self.test = self._contexts(cfg.n_test, gen)
        self.protocol: Protocol = pair_protocol(self.names, tuple(cfg.seen), cfg.alpha0)

    def _contexts(self, n: int, gen: torch.Generator) -> Split:
        groups = torch.multinomial(self.group_shares, n, replacement=True, generator=gen)
        noise = torch.randn(n, self.cfg.actions, self.cfg.d, generator=gen, dtype=torch.float64)
        phi = (noise + self.cluster_means[groups][:, None, :]) / math.sqrt(self.cfg.d)
        return Split(phi, groups)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    # --- exact quantities ------------------------------------------------------------------
    def heads(self, phi: Tensor) -> Tensor:
        """Per-objective rewards ``r_k(x, a)``: ``[..., A, d] -> [..., A, K]``."""
        return phi @ self.objectives.T

    def train_weights(self) -> Tensor:
        return torch.tensor(self.protocol.train.weights, dtype=torch.float64)

    def log_policy(self, theta: Tensor, phi: Tensor) -> Tensor:
        """``log pi_theta(a|x)`` for every action: ``[N, A]``."""
        return torch.log_softmax(phi @ theta, dim=-1)

    def expected_heads(self, theta: Tensor, split: str) -> Tensor:
        """``R[x, k] = E_{a ~ pi_theta(.|x)} r_k(x, a)``, exact: ``[N, K]``."""
        phi = self.split(split).phi
        return torch.einsum("na,nak->nk", self.log_policy(theta, phi).exp(), self.heads(phi))

    def kl_to_reference(self, theta: Tensor, split: str = "test") -> Tensor:
        """Mean over contexts of ``KL(pi_theta(.|x) || pi_ref(.|x))``, exact."""
        phi = self.split(split).phi
        logp, logq = self.log_policy(theta, phi), self.log_policy(self.theta_ref, phi)
        return (logp.exp() * (logp - logq)).sum(-1).mean()


register_task(
    TaskSpec(
        name="linear",
        config_cls=LinearConfig,
        builder=LinearTask,
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
