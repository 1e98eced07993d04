"""Preference mixtures over a task's K named objectives: training, validation and test sets.

A mixture is a weight vector over the objectives. Convex: ``r = sum_k w_k r_k``; geometric:
``r = prod_k (r_k + 1e-8)^{w_k}`` (for non-negative heads). Validation and test mixtures are
disjoint, so tuning on validation never sees a test mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_TEST = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
ALPHA_VAL = (0.2, 0.4, 0.6, 0.8)


@dataclass(frozen=True)
class Mixture:
    name: str
    weights: tuple[float, ...]
    kind: str = "convex"

    def apply(self, heads: Tensor) -> Tensor:
        """Mixture reward from per-objective rewards ``heads[..., K]``."""
        w = heads.new_tensor(self.weights)
        if self.kind == "convex":
            return heads @ w
        if self.kind == "geometric":
            return torch.exp(torch.log(heads.clamp_min(0) + 1e-8) @ w)
        raise ValueError(f"unknown mixture kind {self.kind!r}; known: convex, geometric")


def _mix(names: list[str], parts: dict[int, float], kind: str) -> Mixture:
    weights = [0.0] * len(names)
    for k, w in parts.items():
        weights[k] += w
    label = " + ".join(f"{w:g}·{names[k]}" for k, w in sorted(parts.items()) if w > 0)
    return Mixture(label, tuple(weights), kind)


@dataclass(frozen=True)
class Protocol:
    """The training mixture and the validation / test mixture sets of a task."""

    train: Mixture
    val: tuple[Mixture, ...]
    test: tuple[Mixture, ...]
    seen: tuple[int, int]


def pair_protocol(names: list[str], seen: tuple[int, int], alpha0: float, kind: str = "convex") -> Protocol:
    """Train on ``alpha0·seen[0] + (1-alpha0)·seen[1]``; test across the alpha grid of the seen
    pair, every unseen objective alone and half-and-half with each seen one; validate on the
    in-between alphas and on 1:3 blends of unseen with seen objectives.
    """
    a, b = seen
    if a == b or not (0 <= a < len(names) and 0 <= b < len(names)):
        raise ValueError(f"seen must be two distinct objective indices in [0, {len(names)}), got {seen}")
    if not 0 <= alpha0 <= 1:
        raise ValueError(f"alpha0 must lie in [0, 1], got {alpha0}")
    unseen = [k for k in range(len(names)) if k not in seen]
    test = [_mix(names, {a: al, b: 1 - al}, kind) for al in ALPHA_TEST]
    val = [_mix(names, {a: al, b: 1 - al}, kind) for al in ALPHA_VAL]
    for u in unseen:
        test.append(_mix(names, {u: 1.0}, kind))
        for s in seen:
            test.append(_mix(names, {u: 0.5, s: 0.5}, kind))
            val.append(_mix(names, {u: 0.25, s: 0.75}, kind))
    train = _mix(names, {a: alpha0, b: 1 - alpha0}, kind)
    return Protocol(train, tuple(val), tuple(test), (a, b))
