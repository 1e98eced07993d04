"""Scores of a policy on held-out preference mixtures, from per-prompt objective rewards.

Responses are scored once into ``R[N, K]`` (one row per held-out prompt, one column per objective);
every mixture is then a weight vector over the columns, so adding mixtures costs nothing. Per
mixture: the mean over prompts with a percentile bootstrap CI over prompts; then the worst case
(min over test mixtures, with its own bootstrap CI), the mean over test mixtures and the reward of
the training mixture. Validation mixtures are scored on validation prompts for tuning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks.mixtures import Mixture, Protocol


def _mixture_matrix(heads: Tensor, mixtures: tuple[Mixture, ...]) -> Tensor:
    return torch.stack([m.apply(heads) for m in mixtures], dim=1)  # [N, M]


def _bootstrap(values: Tensor, reps: int, gen: torch.Generator) -> Tensor:
    """Bootstrap replicates of the column means of ``values[N, M]``: ``[reps, M]``."""
    idx = torch.randint(values.shape[0], (reps, values.shape[0]), generator=gen)
    return values[idx].mean(1)


def mixture_scores(
    test_heads: Tensor, val_heads: Tensor, protocol: Protocol, *, bootstrap: int = 1000, seed: int = 0
) -> dict:
    """All mixture metrics of one evaluation (floats, JSON-ready)."""
    gen = torch.Generator().manual_seed(seed)
    test = _mixture_matrix(test_heads.double(), protocol.test)
    means = test.mean(0)
    out: dict = {"mixtures": {}}
    reps = _bootstrap(test, bootstrap, gen) if bootstrap else None
    for j, m in enumerate(protocol.test):
        row = {"reward": float(means[j])}
        if reps is not None:
            lo, hi = torch.quantile(reps[:, j], torch.tensor([0.025, 0.975], dtype=reps.dtype))
            row.update(ci_low=float(lo), ci_high=float(hi))
        out["mixtures"][m.name] = row
    worst = int(means.argmin())
    out["worst_case"] = float(means[worst])
    out["worst_mixture"] = protocol.test[worst].name
    if reps is not None:
        lo, hi = torch.quantile(reps.min(1).values, torch.tensor([0.025, 0.975], dtype=reps.dtype))
        out["worst_case_ci"] = [float(lo), float(hi)]
    out["mean_over_test"] = float(means.mean())
    out["train_reward"] = float(protocol.train.apply(test_heads.double()).mean())
    val = _mixture_matrix(val_heads.double(), protocol.val).mean(0)
    out["val_worst_case"] = float(val.min())
    out["val_mean"] = float(val.mean())
    return out
