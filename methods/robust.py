"""Ambiguity sets: how the per-sample losses of a batch become a robust objective.

Every weight function takes a 1-D tensor of per-sample losses ``l`` (and optionally a base
distribution ``q`` over the samples, uniform by default) and returns ``(weights, value)``:

* ``weights`` is a detached distribution ``p`` over the samples: the worst case in the ball;
* ``value`` is the robust objective ``sup_{P in ball} E_P[l]`` (detached).

By the envelope theorem the gradient of the robust objective is ``sum_i p_i grad l_i`` with ``p``
held constant, so a training step only needs ``(weights * losses).sum()``; see
``methods.objective``. All solves run in float64 on the losses' device and are exact (closed form
or a sort), except the constrained KL ball, which bisects its 1-D dual to machine precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "chi2_weights",
    "group_weights",
    "kl_constrained",
    "kl_weights",
    "softmin_weights",
    "tv_weights",
]


def _prepare(losses: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate the losses, return them detached in float64 with the base distribution."""
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    x = losses.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero().flatten().tolist()[:5]
        raise ValueError(f"losses contain NaN or inf at positions {bad}; the robust weights are undefined")
    if base is None:
        q = torch.full_like(x, 1.0 / x.numel())
    else:
        q = base.detach().to(torch.float64)
        if q.shape != x.shape or (q < 0).any() or not math.isclose(float(q.sum()), 1.0, abs_tol=1e-5):
            raise ValueError("base must be a distribution with the same shape as losses")
        q = q / q.sum()
    return x, q


def _check_radius(name: str, value: float, upper: float = math.inf) -> float:
    value = float(value)
    if not (0.0 <= value <= upper) or math.isnan(value):
        raise ValueError(f"{name} must lie in [0, {upper}], got {value}")
    return value


def _on_max(x: Tensor, q: Tensor) -> Tensor:
    """The base distribution restricted to the largest loss (ties share the mass)."""
    top = (x == x.max()).to(x.dtype) * q
    return top / top.sum()


def _out(p: Tensor, value: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    return p.to(like.dtype), value.to(like.dtype)


def kl_weights(losses: Tensor, tau: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Penalized KL-DRO (tilted risk): ``p ∝ q·exp(l/tau)``, value ``tau·log E_q exp(l/tau)``.

    The value equals ``sup_P E_P[l] - tau·KL(P||q)``. ``tau -> 0`` gives the max, ``tau -> inf``
    the mean. Computed as ``max + tau·log1p(E_q expm1((l - max)/tau))``, exact at both ends.
    """
    x, q = _prepare(losses, base)
    tau = _check_radius("tau", tau)
    if tau == 0.0:
        p = _on_max(x, q)
        return _out(p, x.max(), losses)
    top = x.max()
    z = (x - top) / tau
    value = top + tau * torch.log1p((q * torch.expm1(z)).sum())
    p = torch.softmax(z + torch.log(q), dim=0)
    return _out(p, value, losses)


def softmin_weights(losses: Tensor, beta_prime: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dr. DPO's soft-min: value ``-beta'·log E_q exp(-l/beta')``, weights ``p ∝ q·exp(-l/beta')``.

    The mirror image of ``kl_weights``: it down-weights high-loss (likely mislabelled) pairs.
    """
    p, value = kl_weights(-losses, beta_prime, base)
    return p, -value


def kl_constrained(losses: Tensor, radius: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``sup E_P[l]`` over ``KL(P||q) <= radius``.

    Dual: ``inf_{lam>0} lam·radius + lam·log E_q exp(l/lam)``; the worst case is ``p ∝ q·exp(t·l)``
    with ``t = 1/lam*`` the root of ``KL(p_t||q) = radius``. ``KL(p_t||q)`` increases from 0 at
    ``t = 0`` to ``-log q(argmax)`` as ``t -> inf``; at or beyond that radius the answer is the max.
    The root is bracketed by doubling and bisected to machine precision.
    """
    x, q = _prepare(losses, base)
    radius = _check_radius("radius", radius)
    p_top = _on_max(x, q)
    kl_cap = -math.log(float(q[x == x.max()].sum()))
    if radius >= kl_cap or float(x.max() - x.min()) == 0.0:
        p = p_top if radius >= kl_cap else q
        return _out(p, (p * x).sum(), losses)
    if radius == 0.0:
        return _out(q, (q * x).sum(), losses)
    centred = (x - x.max()) / (x.max() - x.min())  # in [-1, 0]: t is on the scale of 1/spread

    def tilt(t: float) -> tuple[Tensor, float]:
        logits = t * centred + torch.log(q)
        p = torch.softmax(logits, dim=0)
        kl = float((p * (torch.log_softmax(logits, dim=0) - torch.log(q))).where(p > 0, 0.0).sum())
        return p, kl

    lo, hi = 0.0, 1.0
    while tilt(hi)[1] < radius:
        lo, hi = hi, 2 * hi
        if hi > 1e300:
            break
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if tilt(mid)[1] < radius:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    p = tilt(lo)[0]
    return _out(p, (p * x).sum(), losses)


def chi2_weights(losses: Tensor, rho: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``sup E_P[l]`` over ``0.5·E_q[(dP/dq - 1)^2] <= rho`` (Duchi & Namkoong), exactly.

    Dual: ``inf_eta eta + C·sqrt(E_q (l - eta)_+^2)`` with ``C = sqrt(1 + 2 rho)``; worst case
    ``p ∝ q·(l - eta*)_+``. With losses sorted in decreasing order and the top-k set active,
    stationarity gives ``eta_k = mu_k - s_k / b_k`` and value ``mu_k + s_k·b_k``, where ``Q_k``,
    ``mu_k``, ``s_k`` are the mass, mean and standard deviation of the top k under q and
    ``b_k = sqrt(C^2·Q_k - 1)``. The optimum is the k whose ``eta_k`` lies in
    ``[l_(k+1), l_(k)]``: one sort and prefix sums, O(n log n), two host syncs in all.
    (The official DRO-REBEL code drops the ``1 +`` in C, which is unbounded below for rho < 1/2.)
    """
    x, q = _prepare(losses, base)
    rho = _check_radius("rho", rho)
    if rho == 0.0:
        return _out(q, (q * x).sum(), losses)
    c2 = 1.0 + 2.0 * rho
    top = x.max()
    order = torch.argsort(x, descending=True)
    xs, qs = x[order] - top, q[order]  # shift by the max: top-k spreads stay well represented
    mass = torch.cumsum(qs, 0)
    mean = torch.cumsum(qs * xs, 0) / mass
    var = (torch.cumsum(qs * xs * xs, 0) / mass - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    b2 = c2 * mass - 1.0
    feasible = b2 > 1e-12
    b = b2.clamp_min(1e-12).sqrt()
    eta = mean - std / b
    nxt = torch.cat([xs[1:], xs.new_tensor([-math.inf])])
    # Relative tolerance: the prefix-sum moments carry rounding of order eps·spread.
    tol = 1e-9 * (xs[0] - xs[-1]).abs().clamp_min(1e-300)
    ok = feasible & (eta >= nxt - tol) & (eta <= xs + tol)
    if not bool(ok.any()):  # rho below float resolution (1 + 2 rho == 1): the mean
        return _out(q, (q * x).sum(), losses)
    k = int(torch.argmax(ok.to(torch.int8)))  # first k that satisfies the interval test
    value = top + mean[k] + std[k] * b[k]
    excess = (x - top - eta[k]).clamp_min(0.0) * q
    p = excess / excess.sum() if excess.sum() > 0 else _on_max(x, q)
    return _out(p, value, losses)


def tv_weights(losses: Tensor, rho: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``sup E_P[l]`` over ``TV(P, q) = 0.5·sum|p - q| <= rho`` (the DRO-DPO of Mandal et al.).

    The worst case moves mass ``rho`` from the lowest losses onto the largest one (ties at the
    max share it): a CVaR-like reweighting. ``rho >= 1 - q(argmax)`` puts all mass on the max.
    """
    x, q = _prepare(losses, base)
    rho = _check_radius("rho", rho, upper=1.0)
    is_top = x == x.max()
    movable = float(q[~is_top].sum())
    if rho >= movable:
        p = _on_max(x, q)
        return _out(p, (p * x).sum(), losses)
    order = torch.argsort(x)  # ascending: drain the smallest losses first
    drained_before = torch.cumsum(q[order], 0) - q[order]
    removed = (rho - drained_before).clamp(min=0.0).minimum(q[order])
    p = q.clone()
    p[order] -= removed
    p = p + rho * _on_max(x, q)
    return _out(p, (p * x).sum(), losses)


def group_weights(
    losses: Tensor, groups: Tensor, alpha: Tensor, eta_alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Group-robust weights (GR-DPO, Ramesh et al.): exponentiated-gradient ascent over groups.

    With ``L_g`` the mean loss of group g in the batch, ``alpha <- alpha·exp(eta_alpha·L_g)``,
    normalized; each sample of group g then gets ``alpha_g / n_g`` (renormalized over the groups
    present). Returns ``(weights, value = sum_g alpha_g L_g, new_alpha)``; alpha is training state.
    """
    x, _ = _prepare(losses, None)
    eta_alpha = _check_radius("eta_alpha", eta_alpha)
    alpha = alpha.detach().to(torch.float64)
    n_groups = alpha.numel()
    groups = groups.to(torch.long)
    if groups.shape != x.shape or int(groups.min()) < 0 or int(groups.max()) >= n_groups:
        raise ValueError(f"groups must be ids in [0, {n_groups}) with the shape of losses")
    counts = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(
        0, groups, torch.ones_like(x)
    )
    sums = torch.zeros_like(counts).index_add_(0, groups, x)
    present = counts > 0
    group_loss = torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums))
    log_alpha = torch.log(alpha.clamp_min(1e-300)) + eta_alpha * group_loss
    new_alpha = torch.softmax(log_alpha, 0)
    active = new_alpha * present
    active = active / active.sum()
    p = active[groups] / counts[groups]
    value = (active * group_loss).sum()
    return p.to(losses.dtype), value.to(losses.dtype), new_alpha.to(alpha.dtype)
