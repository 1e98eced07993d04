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
        return mix_rewards(heads, heads.new_tensor(self.weights), self.kind)


def mix_rewards(heads: Tensor, weights: Tensor, kind: str = "convex") -> Tensor:
    """``sum_k w_k h_k`` (convex) or ``prod_k (h_k + 1e-8)^{w_k}`` (geometric, heads >= 0).

    ``weights`` is ``[K]`` or one row per leading index of ``heads`` (``[..., K]``).
    """
    if kind == "convex":
        return (heads * weights).sum(-1)
    if kind == "geometric":
        return torch.exp((torch.log(heads.clamp_min(0) + 1e-8) * weights).sum(-1))
    raise ValueError(f"unknown mixture kind {kind!r}; known: convex, geometric")


def _mix(names: list[str], parts: dict[int, float], kind: str) -> Mixture:
    weights = [0.0] * len(names)
    for k, w in parts.items():
        weights[k] += w
    label = " + ".join(f"{w:g}·{names[k]}" for k, w in sorted(parts.items()) if w > 0)
    return Mixture(label, tuple(weights), kind)


@dataclass(frozen=True)
class Protocol:
    """The training mixture rule and the validation / test mixture sets of a task.

    ``random_pairs=False``: every prompt is trained on ``train``. ``True`` (the ArmoRM protocol):
    each prompt draws an ordered pair (a, b) of seen objectives and is trained on
    ``alpha0·a + (1-alpha0)·b``; the pair's index is the prompt's group.
    """

    train: Mixture
    val: tuple[Mixture, ...]
    test: tuple[Mixture, ...]
    seen: tuple[int, ...]
    alpha0: float
    random_pairs: bool = False
    names: tuple[str, ...] = ()

    def pair_alpha(self, mixture: Mixture) -> float | None:
        """``alpha`` if ``mixture`` is ``alpha·seen[0] + (1-alpha)·seen[1]``, else None."""
        a, b = self.seen[:2]
        if any(w for k, w in enumerate(mixture.weights) if k not in (a, b)):
            return None
        return mixture.weights[a]

    def pairs(self) -> list[tuple[int, int]]:
        return [(a, b) for a in self.seen for b in self.seen if a != b]

    def sample_train(self, m: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Training mixture weights per prompt ``[m, K]`` and, for random pairs, the pair ids."""
        base = torch.tensor(self.train.weights, dtype=torch.float64)
        if not self.random_pairs:
            return base.expand(m, -1), None
        pairs = self.pairs()
        ids = torch.randint(len(pairs), (m,), generator=generator)
        weights = torch.zeros(m, base.numel(), dtype=torch.float64)
        for row, pid in enumerate(ids.tolist()):
            a, b = pairs[pid]
            weights[row, a] += self.alpha0
            weights[row, b] += 1 - self.alpha0
        return weights, ids


def pair_protocol(
    names: list[str],
    seen: tuple[int, ...],
    alpha0: float,
    kind: str = "convex",
    random_pairs: bool = False,
    evaluate: tuple[int, ...] | None = None,
) -> Protocol:
    """Train on ``alpha0·seen[0] + (1-alpha0)·seen[1]`` (or random seen pairs); test across the
    alpha grid of the first seen pair, every unseen objective alone and half-and-half with each
    seen one; validate on the in-between alphas and on 1:3 blends of unseen with seen objectives.
    ``evaluate`` restricts the unseen objectives to a subset (ArmoRM's five evaluation heads).
    """
    if len(seen) < 2 or len(set(seen)) != len(seen) or not all(0 <= s < len(names) for s in seen):
        raise ValueError(
            f"seen must be at least two distinct objective indices in [0, {len(names)}), got {seen}"
        )
    if not 0 <= alpha0 <= 1:
        raise ValueError(f"alpha0 must lie in [0, 1], got {alpha0}")
    a, b = seen[:2]
    unseen = [k for k in (range(len(names)) if evaluate is None else evaluate) if k not in seen]
    test = [_mix(names, {a: al, b: 1 - al}, kind) for al in ALPHA_TEST]
    val = [_mix(names, {a: al, b: 1 - al}, kind) for al in ALPHA_VAL]
    for u in unseen:
        test.append(_mix(names, {u: 1.0}, kind))
        for s in seen:
            test.append(_mix(names, {u: 0.5, s: 0.5}, kind))
            val.append(_mix(names, {u: 0.25, s: 0.75}, kind))
    train = _mix(names, {a: alpha0, b: 1 - alpha0}, kind)
    return Protocol(train, tuple(val), tuple(test), tuple(seen), alpha0, random_pairs, tuple(names))
