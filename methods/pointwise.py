"""Pointwise preference losses: one loss per pair, as a 1-D tensor.

A batch of n pairs is a ``PairScores``: sequence log-probs of the two responses of each pair
under the policy and under the anchor (the previous iterate or a fixed reference), their rewards,
and ``pref``, the probability that the first response is preferred (1/0 hard labels, or a
Bradley-Terry probability for soft labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PairScores:
    """Per-pair quantities; ``[n, 2]`` tensors hold (first response, second response)."""

    policy_logps: Tensor
    anchor_logps: Tensor | None = None
    rewards: Tensor | None = None
    pref: Tensor | None = None

    def log_ratio_margin(self) -> Tensor:
        """``h = [log pi(y1) - log anchor(y1)] - [log pi(y2) - log anchor(y2)]``."""
        ratio = self.policy_logps if self.anchor_logps is None else self.policy_logps - self.anchor_logps
        return ratio[:, 0] - ratio[:, 1]

    def require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this loss needs {', '.join(missing)} in the pair scores")


def rebel_loss(scores: PairScores, eta: float, form: str = "inv_eta") -> Tensor:
    """REBEL: ``((1/eta)·h - (r(y1) - r(y2)))^2``; ``form='eta_reward'`` is ``(h - eta·Δr)^2``.

    Both forms have the same minimizer; their gradients differ by ``eta^2`` (the official REBEL
    code uses ``eta_reward``, the DRO-REBEL code ``inv_eta``).
    """
    scores.require("anchor_logps", "rewards")
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    h = scores.log_ratio_margin()
    dr = scores.rewards[:, 0] - scores.rewards[:, 1]
    if form == "inv_eta":
        return (h / eta - dr) ** 2
    if form == "eta_reward":
        return (h - eta * dr) ** 2
    raise ValueError(f"unknown REBEL loss form {form!r}; known: inv_eta, eta_reward")


def dpo_loss(scores: PairScores, beta: float) -> Tensor:
    """DPO with soft labels: ``-[p·log σ(beta·h) + (1-p)·log σ(-beta·h)]``, p = ``pref``."""
    scores.require("anchor_logps", "pref")
    z = beta * scores.log_ratio_margin()
    p = scores.pref.to(z.dtype)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def ipo_loss(scores: PairScores, beta: float) -> Tensor:
    """IPO (Azar et al.): ``(h - 1/(2 beta))^2`` toward the preferred side, label-averaged."""
    scores.require("anchor_logps", "pref")
    h = scores.log_ratio_margin()
    p = scores.pref.to(h.dtype)
    target = 1.0 / (2.0 * beta)
    return p * (h - target) ** 2 + (1 - p) * (h + target) ** 2


def bt_loss(scores: PairScores) -> Tensor:
    """Bradley-Terry reward-model loss ``-[p·log σ(r1 - r2) + (1-p)·log σ(r2 - r1)]``.

    Here ``policy_logps`` holds the reward model's scores of the two responses.
    """
    scores.require("pref")
    margin = scores.policy_logps[:, 0] - scores.policy_logps[:, 1]
    p = scores.pref.to(margin.dtype)
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin))


def bradley_terry_pref(rewards: Tensor) -> Tensor:
    """``P(y1 > y2) = σ(r(y1) - r(y2))`` for ``[n, 2]`` rewards."""
    return torch.sigmoid(rewards[:, 0] - rewards[:, 1])


def preference_labels(rewards: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """Labels ``P(first preferred)`` from ``[n, 2]`` rewards.

    ``bernoulli``: a Bradley-Terry sample (0/1); ``soft``: the BT probability; ``argmax``: 1[r1 >= r2].
    """
    p = bradley_terry_pref(rewards)
    if kind == "soft":
        return p
    if kind == "bernoulli":
        return torch.bernoulli(p, generator=generator)
    if kind == "argmax":
        return (rewards[:, 0] >= rewards[:, 1]).to(rewards.dtype)
    raise ValueError(f"unknown label kind {kind!r}; known: bernoulli, soft, argmax")
