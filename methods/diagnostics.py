"""What an ambiguity set did to one global batch, read off the weights it returned.

For weights ``p`` over the N pairs of a step (normalized to a distribution first: GR-DPO's
official update sums to about the batch size):

* ``ess = 1 / sum_i p_i^2``, the effective sample size: N for uniform weights, 1 for one-hot;
  ``ess_frac = ess / N``;
* ``max_weight = max_i p_i`` and ``weight_entropy = -sum_i p_i log p_i`` (nats; log N at uniform);
* ``zero_weight_share``, the share of pairs with ``p_i = 0`` (the chi-square and TV balls drop
  the low-loss pairs outright);
* ``dual_<name>``, the optimal dual variable where the set has one (chi-square eta, KL-ball lambda);
* Wasserstein: ``w_penalty`` (rho0·sqrt(G)) and ``w_penalty_share = penalty / |objective|``;
* group sets: ``group_weights``, the groups' alpha after the step.
"""

from __future__ import annotations

import math

import torch

from methods.objective import GlobalWeights
from methods.registry import Method


def weight_diagnostics(method: Method, stats: GlobalWeights) -> dict[str, float | list[float]]:
    """The diagnostics above for one step's ``stats``; plain floats (JSON-ready)."""
    p = stats.weights.detach().double().flatten()
    p = p / p.sum()
    n = p.numel()
    entropy = -torch.special.xlogy(p, p).sum()  # 0·log 0 = 0
    # one host transfer for all of them (a sync per step on a GPU, not one per number)
    inv_ess, top, ent, zeros = torch.stack(
        [(p * p).sum(), p.max(), entropy, (p == 0).double().mean()]
    ).tolist()
    out: dict[str, float | list[float]] = {
        "ess": 1.0 / inv_ess,
        "ess_frac": 1.0 / inv_ess / n,
        "max_weight": top,
        "weight_entropy": ent,
        "zero_weight_share": zeros,
    }
    agg = method.aggregator
    if agg.dual and stats.dual is not None and math.isfinite(stats.dual):
        out[f"dual_{agg.dual}"] = float(stats.dual)
    if stats.penalty is not None:
        penalty, value = float(stats.penalty), float(stats.value)
        out["w_penalty"] = penalty
        out["w_penalty_share"] = penalty / abs(value) if value else 0.0
    alpha = stats.state.get("alpha") if stats.state else None
    if isinstance(alpha, torch.Tensor):
        out["group_weights"] = [float(a) for a in alpha.flatten()]
    return out
