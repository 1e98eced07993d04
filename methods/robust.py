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
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "chi2_solve",
    "chi2_weights",
    "group_step",
    "group_weights",
    "kl_ball_solve",
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
    if not bool(top.sum() > 0):  # else 0 / 0: NaN weights
        raise ValueError("base gives the largest loss mass 0; drop the samples of base mass 0")
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
    """``sup E_P[l]`` over ``KL(P||q) <= radius``: ``(weights, value)`` of ``kl_ball_solve``."""
    p, value, _ = kl_ball_solve(losses, radius, base)
    return p, value


def kl_ball_solve(
    losses: Tensor, radius: float, base: Tensor | None = None
) -> tuple[Tensor, Tensor, float | None]:
    """``sup E_P[l]`` over ``KL(P||q) <= radius``: ``(weights, value, lam*)``.

    Dual: ``inf_{lam>0} lam·radius + lam·log E_q exp(l/lam)``; the worst case is ``p ∝ q·exp(t·l)``
    with ``t = 1/lam*`` the root of ``KL(p_t||q) = radius``. ``KL(p_t||q)`` increases from 0 at
    ``t = 0`` to ``-log q(argmax)`` as ``t -> inf``; at or beyond that radius the answer is the max.
    The root is bracketed by doubling and bisected to machine precision. ``lam*`` is 0 when the
    ball holds the max, None when the dual has no finite minimizer (radius 0, or equal losses).
    """
    x, q = _prepare(losses, base)
    radius = _check_radius("radius", radius)
    p_top = _on_max(x, q)
    kl_cap = -math.log(float(q[x == x.max()].sum()))
    spread = float(x.max() - x.min())
    if radius >= kl_cap or spread == 0.0:
        p = p_top if radius >= kl_cap else q
        return (*_out(p, (p * x).sum(), losses), 0.0 if radius >= kl_cap else None)
    if radius == 0.0:
        return (*_out(q, (q * x).sum(), losses), None)
    centred = (x - x.max()) / spread  # in [-1, 0]: t is on the scale of 1/spread, lam = spread / t

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
    return (*_out(p, (p * x).sum(), losses), spread / lo if lo > 0 else None)


def chi2_weights(losses: Tensor, rho: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``sup E_P[l]`` over ``0.5·E_q[(dP/dq - 1)^2] <= rho``: ``(weights, value)`` of ``chi2_solve``."""
    p, value, _ = chi2_solve(losses, rho, base)
    return p, value


def chi2_solve(losses: Tensor, rho: float, base: Tensor | None = None) -> tuple[Tensor, Tensor, float | None]:
    """``sup E_P[l]`` over ``0.5·E_q[(dP/dq - 1)^2] <= rho`` (Duchi & Namkoong), exactly:
    ``(weights, value, eta*)``, eta* None where the worst case is the mean (rho 0).

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
        return (*_out(q, (q * x).sum(), losses), None)
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
        return (*_out(q, (q * x).sum(), losses), None)
    k = int(torch.argmax(ok.to(torch.int8)))  # first k that satisfies the interval test
    value = top + mean[k] + std[k] * b[k]
    excess = (x - top - eta[k]).clamp_min(0.0) * q
    p = excess / excess.sum() if excess.sum() > 0 else _on_max(x, q)
    return (*_out(p, value, losses), float(top + eta[k]))


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


GROUP_UPDATES = ("bench", "official")


def group_step(
    losses: Tensor,
    groups: Tensor,
    state: dict | None,
    eta_alpha: float,
    *,
    n_groups: int | None = None,
    update: str = "bench",
    shares: Tensor | Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """One GR-DPO / GR-IPO step over a global batch: ``(weights, value, new_state)``.

    The state is ``{"alpha": [K] group weights, "log_norm": log Z}``, where, writing ``c_g`` for
    ``eta_alpha`` times the summed past group losses of group g (so ``alpha = softmax(c)``),
    ``Z = sum_g exp(c_g)``; a fresh state is uniform, ``c = 0``, ``Z = K``.

    The number of groups K is ``n_groups`` when given (pass the task's group count: then every
    batch, with any groups absent, updates the same K weights). Without it K grows with the ids
    seen: the first batch gives ``max id + 1``, and a later id ``>= K`` grows the state to
    ``id + 1``. **Growth rule**: a new group enters with ``c = 0``, the cumulative loss of a group
    never seen, since absent groups have group loss 0 in both updates. So ``Z <- Z + m`` for m new
    groups, the old weights scale by ``Z_old / Z_new`` and each new one gets ``1 / Z_new``: the
    state after growth is exactly the state of a run told K from the start. (States saved without
    ``log_norm`` are taken to have ``Z = K_old``.) Under ``update="bench"`` the weights and values
    of the earlier steps are the same as well; under ``"official"`` they are not (a known K puts
    mass on groups not yet seen), so pass ``n_groups`` there.

    Updates, with ``S_g`` the summed loss and ``n_g`` the count of group g in the batch:

    * ``bench`` (the default): ``L_g = S_g / n_g`` (0 for an absent group),
      ``alpha <- alpha·exp(eta_alpha·L)`` normalized; the weights are renormalized over the groups
      present, sample i of group g gets ``alpha_g / (n_g·sum_{present} alpha)``, and the value is
      ``sum_{present} alpha_g L_g / sum_{present} alpha``: the weights are a distribution.
    * ``official``: the update of the official GR-DPO code, github.com/rsshyam/
      Group-robust-preference-optimization, ``src/trainers/grouptrainer.py`` (``GroupTrainer.
      compute_group_metric`` and ``compute_robust_loss``, the same in ``grouptrainerearlystop.py``;
      ``config/loss/rdpo.yaml`` and ``ripo.yaml`` set ``divide_by_totalcount: True``). With
      ``shares`` (the training set's size of each group, counts or fractions, normalized here):
      ``L_g = N·S_g / N_g = S_g / share_g``, the code's ``total_count * (group_map @ losses) /
      group_counts`` with dataset counts; without: its ``divide_by_totalcount=False`` branch,
      ``L_g = S_g / max(n_g, 1)``. Then ``alpha <- alpha·exp(eta_alpha·L)`` normalized over all K
      groups, **no** renormalization over the groups present, value ``sum_g alpha_g L_g`` and
      sample i of group g weighted ``alpha_g / share_g`` (resp. ``alpha_g / n_g``). With shares the
      weights sum to about the batch size, not 1 (``E[S_g] = B·share_g·mean_g``): the official
      robust loss is on the scale of a batch sum. Unlike the official trainer, which updates alpha
      once per micro-batch and rank, alpha is updated once per optimizer step over the global
      batch (equal to the official code with one micro-batch on one device).

    In both, alpha is updated first and the step is weighted by the updated alpha, held constant
    for the gradient (the official code's ``adjusted_loss = group_loss.clone().detach()``).
    """
    if update not in GROUP_UPDATES:
        raise ValueError(f"unknown group update {update!r}; known: {', '.join(GROUP_UPDATES)}")
    x, _ = _prepare(losses, None)
    eta_alpha = _check_radius("eta_alpha", eta_alpha)
    groups = groups.to(device=x.device, dtype=torch.long)
    if groups.shape != x.shape or int(groups.min()) < 0:
        raise ValueError("groups must be non-negative ids with the shape of losses")
    alpha, log_norm = _group_state(state or {}, n_groups, int(groups.max()) + 1, x.device)
    k = alpha.numel()
    if int(groups.max()) >= k:
        raise ValueError(f"groups must be ids in [0, {k}) with the shape of losses")
    counts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, groups, torch.ones_like(x))
    sums = torch.zeros_like(counts).index_add_(0, groups, x)
    if update == "official" and shares is not None:
        denom = _shares(shares, k, counts)
    else:
        denom = counts.clamp_min(1.0)
    group_loss = sums / denom
    log_alpha = torch.log(alpha.clamp_min(1e-300)) + eta_alpha * group_loss
    new_alpha = torch.softmax(log_alpha, 0)
    new_state = {"alpha": new_alpha, "log_norm": log_norm + torch.logsumexp(log_alpha, 0)}
    if update == "official":
        p = new_alpha[groups] / denom[groups]
        value = (new_alpha * group_loss).sum()
    else:
        active = new_alpha * (counts > 0)
        active = active / active.sum()
        p = active[groups] / denom[groups]
        value = (active * group_loss).sum()
    return p.to(losses.dtype), value.to(losses.dtype), new_state


def _group_state(state: dict, n_groups: int | None, needed: int, device) -> tuple[Tensor, Tensor]:
    """``(alpha, log_norm)`` of the state, created or grown to K groups (``group_step``'s rule)."""
    alpha = state.get("alpha")
    have = 0 if alpha is None else alpha.numel()
    if n_groups is not None:
        if n_groups < 1 or have > n_groups:
            raise ValueError(f"n_groups = {n_groups}, but the group state holds {have} groups")
        k = n_groups
    else:
        k = max(have, needed)
    if alpha is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64, device=device), _f64(math.log(k), device)
    alpha = alpha.detach().to(device=device, dtype=torch.float64)
    log_norm = state.get("log_norm")
    log_norm = _f64(math.log(have), device) if log_norm is None else _f64(log_norm, device)
    if k == have:
        return alpha, log_norm
    grown = torch.logaddexp(log_norm, _f64(math.log(k - have), device))
    new = torch.full((k - have,), 1.0, dtype=torch.float64, device=device)
    return torch.cat([alpha * torch.exp(log_norm - grown), new * torch.exp(-grown)]), grown


def _f64(value, device) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).to(device).reshape(())


def _shares(shares, k: int, counts: Tensor) -> Tensor:
    """The training set's group fractions (counts or fractions, normalized), validated."""
    s = torch.as_tensor(shares, dtype=torch.float64).to(counts.device).flatten()
    if s.numel() != k or not torch.isfinite(s).all() or (s < 0).any() or float(s.sum()) <= 0:
        raise ValueError(f"group shares must be {k} non-negative numbers (counts or fractions)")
    s = s / s.sum()
    if ((s == 0) & (counts > 0)).any():
        raise ValueError("a group with share 0 in the training set appears in the batch")
    return s.clamp_min(1e-300)


def group_weights(
    losses: Tensor, groups: Tensor, alpha: Tensor, eta_alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Group-robust weights (GR-DPO, Ramesh et al.): exponentiated-gradient ascent over groups.

    With ``L_g`` the mean loss of group g in the batch, ``alpha <- alpha·exp(eta_alpha·L_g)``,
    normalized; each sample of group g then gets ``alpha_g / n_g`` (renormalized over the groups
    present). Returns ``(weights, value = sum_g alpha_g L_g, new_alpha)``; alpha is training state,
    with one entry per group (``len(alpha)`` groups). ``group_step`` is the stateful form.
    """
    p, value, state = group_step(
        losses, groups, {"alpha": alpha}, eta_alpha, n_groups=alpha.numel(), update="bench"
    )
    return p, value, state["alpha"]  # float64, as the state keeps it
