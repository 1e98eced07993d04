"""Compose a method's robust objective so that its gradient is the same for any batching.

Statistics are over the **global** batch: all micro-batches of an accumulation step and all
data-parallel ranks. ``global_weights`` computes them once per step from detached losses;
``local_objective`` then gives, for any slice of the global batch, a scalar whose gradients summed
over the slices equal the gradient of the full-batch robust objective (envelope theorem):

* reweighting sets: ``sum_{i in slice} p_i·l_i``;
* Wasserstein, ``sqrt_mean``: ``sum_{i in slice} l_i/N + c·sum_{i in slice} g_i/N`` with
  ``c = rho0 / (2·sqrt(G))`` and ``G`` the global mean of ``g``, since
  ``d rho0·sqrt(G) = rho0·dG / (2·sqrt(G))``; ``per_sample_sq``: ``c = rho0``.

Under DDP, which averages gradients over ranks, multiply the local objective by the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from methods import robust
from methods.distributed import gather_detached
from methods.registry import Method
from methods.wasserstein import SQRT_EPS, grad_sq_norms


@dataclass(frozen=True)
class GroupOptions:
    """How GR-DPO / GR-IPO count and update groups (``robust.group_step``).

    ``n_groups``: the task's number of groups (None: grown from the ids seen); ``update``:
    ``bench`` or ``official``; ``shares``: the training set's size of each group (official update).
    """

    n_groups: int | None = None
    update: str = "bench"
    shares: Tensor | Sequence[float] | None = None


@dataclass
class GlobalWeights:
    """Detached statistics of one optimizer step over the global batch."""

    weights: Tensor  # [N] worst-case distribution over the global batch
    value: Tensor  # the robust objective (detached)
    grad_scale: float | Tensor = 0.0  # Wasserstein: factor on sum_i g_i / N
    state: dict = field(default_factory=dict)  # aggregator state after this step (group alpha)
    dual: float | None = None  # the optimal dual variable, for an aggregator that names one
    penalty: Tensor | None = None  # Wasserstein: the penalty term of ``value`` (rho0·sqrt(G))


def global_weights(
    method: Method,
    radius: float,
    losses: Tensor,
    *,
    grad_sq: Tensor | None = None,
    groups: Tensor | None = None,
    state: dict | None = None,
    w_form: str = "sqrt_mean",
    group_options: GroupOptions | None = None,
) -> GlobalWeights:
    """Weights and value of ``method`` from the detached losses of the whole global batch.

    Group methods (GR-DPO, GR-IPO) take ``groups`` (an id per sample) and ``group_options``.
    """
    agg = method.aggregator
    losses = losses.detach()
    n = losses.numel()
    if agg.kind == "weights":
        p, value, *dual = agg.weights(losses, radius)
        return GlobalWeights(p, value, dual=dual[0] if agg.dual else None)
    if agg.kind == "group":
        if groups is None:
            raise ValueError(f"{method.name} needs a group id per sample")
        opts = group_options or GroupOptions()
        p, value, new_state = robust.group_step(
            losses, groups, state, radius, n_groups=opts.n_groups, update=opts.update, shares=opts.shares
        )
        return GlobalWeights(p, value, state=new_state)
    if agg.kind == "wasserstein":
        if grad_sq is None:
            raise ValueError(f"{method.name} needs the per-sample input-gradient norms")
        p = losses.new_full((n,), 1.0 / n)
        big_g = grad_sq.detach().mean()
        if w_form == "sqrt_mean":
            root = torch.sqrt(big_g + SQRT_EPS)
            penalty = radius * root
            return GlobalWeights(p, losses.mean() + penalty, grad_scale=radius / (2 * root), penalty=penalty)
        if w_form == "per_sample_sq":
            penalty = radius * big_g
            return GlobalWeights(p, losses.mean() + penalty, grad_scale=radius, penalty=penalty)
        raise ValueError(f"unknown Wasserstein form {w_form!r}; known: sqrt_mean, per_sample_sq")
    raise ValueError(f"aggregator {agg.name!r} has unknown kind {agg.kind!r}")


def local_objective(
    stats: GlobalWeights, losses: Tensor, offset: int, grad_sq: Tensor | None = None
) -> Tensor:
    """The differentiable share of the slice ``[offset, offset + n)`` of the global batch."""
    n_total = stats.weights.numel()
    p = stats.weights[offset : offset + losses.numel()].to(losses.dtype)
    objective = (p * losses).sum()
    if grad_sq is not None:
        objective = objective + stats.grad_scale * grad_sq.sum() / n_total
    return objective


def gathered_weights(
    method: Method,
    radius: float,
    losses: Tensor,
    grad_sq: Tensor | None,
    groups: Tensor | None,
    **kwargs,
) -> tuple[GlobalWeights, int]:
    """``global_weights`` of this rank's detached losses (and penalty norms and group ids) all-gathered
    across ranks, with the offset of this rank's block in the global batch."""
    global_losses, offset = gather_detached(losses)
    global_g = None if grad_sq is None else gather_detached(grad_sq)[0]
    global_groups = None if groups is None else gather_detached(groups.to(torch.float64))[0].round().long()
    stats = global_weights(method, radius, global_losses, grad_sq=global_g, groups=global_groups, **kwargs)
    return stats, offset


@dataclass
class Objective:
    loss: Tensor  # backprop this: same gradient as the robust objective
    stats: GlobalWeights


def robust_objective(
    method: Method,
    radius: float,
    losses: Tensor,
    *,
    inputs: Sequence[Tensor] = (),
    groups: Tensor | None = None,
    state: dict | None = None,
    w_form: str = "sqrt_mean",
    group_options: GroupOptions | None = None,
) -> Objective:
    """One step's objective when each rank holds its whole local batch (no accumulation).

    ``inputs`` are the tensors the Wasserstein penalty differentiates (input embeddings or
    features); detached losses, groups and penalty norms are all-gathered across ranks.
    """
    grad_sq = None
    if method.aggregator.kind == "wasserstein":
        if not inputs:
            raise ValueError(f"{method.name} needs the inputs (embeddings) the losses depend on")
        grad_sq = grad_sq_norms(losses, inputs, create_graph=True)
    stats, offset = gathered_weights(
        method, radius, losses, grad_sq, groups, state=state, w_form=w_form, group_options=group_options
    )
    return Objective(local_objective(stats, losses, offset, grad_sq), stats)


def accumulate_gradients(
    method: Method,
    radius: float,
    micro_batches: Sequence[object],
    losses_fn: Callable[[object], tuple[Tensor, Sequence[Tensor]]],
    *,
    groups: Tensor | None = None,
    state: dict | None = None,
    w_form: str = "sqrt_mean",
    group_options: GroupOptions | None = None,
) -> GlobalWeights:
    """Backpropagate the robust objective of a step split into micro-batches (and ranks).

    ``losses_fn(mb)`` returns the per-sample losses of a micro-batch and the inputs the
    Wasserstein penalty differentiates. Pass 1 computes the detached global statistics (losses;
    for Wasserstein also the first-order input-gradient norms), pass 2 backpropagates each
    micro-batch's share, so ``.grad`` ends up equal to the full-batch gradient. The price is one
    extra forward (plus one input-gradient backward for Wasserstein) per step; with a single
    micro-batch, call ``robust_objective`` instead and pay nothing.
    """
    wasserstein = method.aggregator.kind == "wasserstein"
    parts, norms = [], []
    for mb in micro_batches:
        with torch.set_grad_enabled(wasserstein):
            losses, inputs = losses_fn(mb)
            if wasserstein:
                norms.append(grad_sq_norms(losses, inputs, create_graph=False).detach())
        parts.append(losses.detach())
    local_g = torch.cat(norms) if wasserstein else None
    stats, offset = gathered_weights(
        method,
        radius,
        torch.cat(parts),
        local_g,
        groups,
        state=state,
        w_form=w_form,
        group_options=group_options,
    )
    for mb, part in zip(micro_batches, parts, strict=True):
        losses, inputs = losses_fn(mb)
        grad_sq = grad_sq_norms(losses, inputs, create_graph=True) if wasserstein else None
        local_objective(stats, losses, offset, grad_sq).backward()
        offset += part.numel()
    return stats


def backward_robust(
    method: Method,
    radius: float,
    n: int,
    losses_fn: Callable[[Tensor], tuple[Tensor, Sequence[Tensor]]],
    *,
    micro_batch: int = 0,
    groups: Tensor | None = None,
    state: dict | None = None,
    w_form: str = "sqrt_mean",
    group_options: GroupOptions | None = None,
) -> GlobalWeights:
    """Backpropagate one step's robust objective over ``n`` local samples.

    ``losses_fn(rows)`` returns the losses of the given row indices and the penalty inputs. With
    ``micro_batch`` in ``(0, n)`` the step is accumulated in slices of that size (two passes);
    otherwise it is one pass. Either way ``.grad`` is the full global-batch gradient.
    """
    rows = torch.arange(n)
    if micro_batch and micro_batch < n:
        return accumulate_gradients(
            method,
            radius,
            list(rows.split(micro_batch)),
            losses_fn,
            groups=groups,
            state=state,
            w_form=w_form,
            group_options=group_options,
        )
    losses, inputs = losses_fn(rows)
    objective = robust_objective(
        method,
        radius,
        losses,
        inputs=inputs,
        groups=groups,
        state=state,
        w_form=w_form,
        group_options=group_options,
    )
    objective.loss.backward()
    return objective.stats
