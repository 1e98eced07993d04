"""Robust aggregators against independent solvers (scipy) and closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, special

from methods.robust import (
    chi2_weights,
    group_weights,
    kl_constrained,
    kl_weights,
    softmin_weights,
    tv_weights,
)

RNG = np.random.default_rng(0)
CASES = [RNG.normal(size=20) * s + m for s, m in [(1, 0), (3, 2), (0.1, -1)]] + [RNG.exponential(size=15)]


def primal(losses, constraint, q=None):
    """max_p p·l over the simplex subject to constraint(p) >= 0, by SLSQP from several starts."""
    n = len(losses)
    q = np.full(n, 1 / n) if q is None else q
    cons = [{"type": "eq", "fun": lambda p: p.sum() - 1}, {"type": "ineq", "fun": constraint}]
    best = None
    for start in (q, 0.7 * q + 0.3 * np.eye(n)[np.argmax(losses)]):
        res = optimize.minimize(
            lambda p: -p @ losses,
            start,
            jac=lambda p: -losses,
            bounds=[(0, 1)] * n,
            constraints=cons,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return -best.fun, best.x


@pytest.mark.parametrize("losses", CASES)
@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5, 2.0])
def test_chi2_matches_primal_and_dual(losses, rho):
    p, value = chi2_weights(torch.tensor(losses), rho)
    n = len(losses)
    ref_value, ref_p = primal(losses, lambda p: rho - 0.5 * n * ((p - 1 / n) ** 2).sum())
    dual = optimize.minimize_scalar(
        lambda eta: eta + math.sqrt(1 + 2 * rho) * math.sqrt(np.mean(np.maximum(losses - eta, 0) ** 2)),
        bounds=(losses.min() - 100, losses.max()),
        method="bounded",
        options={"xatol": 1e-12},
    )
    assert float(value) == pytest.approx(dual.fun, abs=1e-6)
    assert float(value) == pytest.approx(ref_value, abs=1e-5)
    np.testing.assert_allclose(p.numpy(), ref_p, atol=1e-4)
    assert float(p @ torch.tensor(losses)) == pytest.approx(float(value), abs=1e-9)


@pytest.mark.parametrize("losses", CASES)
@pytest.mark.parametrize("eps", [0.001, 0.05, 0.3, 1.0])
def test_kl_ball_matches_primal(losses, eps):
    p, value = kl_constrained(torch.tensor(losses), eps)
    n = len(losses)
    ref_value, ref_p = primal(losses, lambda p: eps - np.sum(special.xlogy(p, n * p)))
    assert float(value) == pytest.approx(ref_value, abs=1e-5)
    np.testing.assert_allclose(p.numpy(), ref_p, atol=1e-4)
    kl = float(np.sum(special.xlogy(p.numpy(), n * p.numpy())))
    assert kl == pytest.approx(eps, rel=1e-6)


@pytest.mark.parametrize("losses", CASES)
@pytest.mark.parametrize("rho", [0.0, 0.05, 0.3, 0.8, 1.0])
def test_tv_matches_linear_program(losses, rho):
    p, value = tv_weights(torch.tensor(losses), rho)
    n = len(losses)
    # variables [p (n), t (n)]: max l·p, |p - 1/n| <= t, 0.5·sum t <= rho, sum p = 1
    c = np.concatenate([-losses, np.zeros(n)])
    eye = np.eye(n)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, n)), 0.5 * np.ones((1, n))]])
    b_ub = np.concatenate([np.full(n, 1 / n), np.full(n, -1 / n), [rho]])
    a_eq = np.concatenate([np.ones(n), np.zeros(n)])[None]
    res = optimize.linprog(c, a_ub, b_ub, a_eq, [1.0], bounds=[(0, None)] * (2 * n), method="highs")
    assert float(value) == pytest.approx(-res.fun, abs=1e-9)
    np.testing.assert_allclose(p.numpy(), res.x[:n], atol=1e-9)


@pytest.mark.parametrize("losses", CASES)
@pytest.mark.parametrize("tau", [0.05, 0.5, 5.0])
def test_kl_penalized_closed_form(losses, tau):
    p, value = kl_weights(torch.tensor(losses), tau)
    n = len(losses)
    assert float(value) == pytest.approx(tau * (special.logsumexp(losses / tau) - math.log(n)), abs=1e-10)
    np.testing.assert_allclose(p.numpy(), special.softmax(losses / tau), atol=1e-12)
    # It is the penalized sup: sup_P E_P l - tau·KL(P||U), attained at p.
    kl = np.sum(special.xlogy(p.numpy(), n * p.numpy()))
    assert float(p.numpy() @ losses - tau * kl) == pytest.approx(float(value), abs=1e-9)


@pytest.mark.parametrize("beta_prime", [0.1, 1.0, 10.0])
def test_softmin_closed_form(beta_prime):
    losses = CASES[1]
    p, value = softmin_weights(torch.tensor(losses), beta_prime)
    expected = -beta_prime * (special.logsumexp(-losses / beta_prime) - math.log(len(losses)))
    assert float(value) == pytest.approx(expected, abs=1e-10)
    np.testing.assert_allclose(p.numpy(), special.softmax(-losses / beta_prime), atol=1e-12)
    assert float(value) <= losses.mean()


def test_group_weights_by_hand():
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0])
    groups = torch.tensor([0, 0, 1, 2, 2])
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p, value, new_alpha = group_weights(losses, groups, alpha, eta_alpha=0.7)
    group_loss = np.array([2.0, 2.0, 2.25])
    a = np.array([0.5, 0.3, 0.2]) * np.exp(0.7 * group_loss)
    a /= a.sum()
    np.testing.assert_allclose(new_alpha.numpy(), a, atol=1e-12)
    np.testing.assert_allclose(p.numpy(), [a[0] / 2, a[0] / 2, a[1], a[2] / 2, a[2] / 2], atol=1e-7)
    assert float(value) == pytest.approx(float(a @ group_loss), abs=1e-6)


@pytest.mark.parametrize("fn", [chi2_weights, kl_constrained, tv_weights])
def test_weighted_base_equals_repeated_samples(fn):
    atoms = torch.tensor([0.3, 2.0, -1.0, 0.7])
    counts = torch.tensor([3, 1, 5, 2])
    p_w, v_w = fn(atoms.double(), 0.2, base=(counts / counts.sum()).double())
    expanded = atoms.repeat_interleave(counts).double()
    p_e, v_e = fn(expanded, 0.2)
    assert float(v_w) == pytest.approx(float(v_e), abs=1e-8)
    folded = torch.zeros(4, dtype=torch.float64).index_add_(0, torch.arange(4).repeat_interleave(counts), p_e)
    np.testing.assert_allclose(p_w.numpy(), folded.numpy(), atol=1e-7)


ALL = [
    (chi2_weights, 0.3),
    (kl_constrained, 0.2),
    (tv_weights, 0.3),
    (kl_weights, 0.5),
    (softmin_weights, 0.5),
]


@pytest.mark.parametrize("fn,radius", ALL)
def test_edge_all_equal_and_single(fn, radius):
    for losses in (torch.full((7,), 2.5), torch.tensor([3.0])):
        p, value = fn(losses, radius)
        assert torch.allclose(p, torch.full_like(p, 1 / len(p)))
        assert float(value) == pytest.approx(float(losses[0]), abs=1e-6)


@pytest.mark.parametrize("fn", [chi2_weights, kl_constrained, tv_weights])
def test_edge_zero_radius_is_the_mean(fn):
    losses = torch.tensor(CASES[0])
    p, value = fn(losses, 0.0)
    assert float(value) == pytest.approx(float(losses.mean()), abs=1e-12)
    assert torch.allclose(p, torch.full_like(p, 1 / len(p)))


def test_edge_kl_temperature_limits():
    losses = torch.tensor(CASES[1])
    for tau in (0.0, 1e-12, 1e-6):
        p, value = kl_weights(losses, tau)
        assert float(value) == pytest.approx(float(losses.max()), abs=1e-5)
        assert int(p.argmax()) == int(losses.argmax()) and float(p.max()) == pytest.approx(1.0, abs=1e-6)
    for tau in (1e8, 1e15):
        p, value = kl_weights(losses, tau)
        assert float(value) == pytest.approx(float(losses.mean()), abs=1e-6)
        assert torch.allclose(p, torch.full_like(p, 1 / len(p)), atol=1e-8)


@pytest.mark.parametrize("fn,radius", ALL)
def test_edge_huge_losses_shift_exactly(fn, radius):
    base = torch.tensor(CASES[0])
    p0, v0 = fn(base, radius)
    p1, v1 = fn(base + 1e4, radius)
    assert torch.isfinite(v1) and float(v1) == pytest.approx(float(v0) + 1e4, abs=1e-7)
    assert torch.allclose(p0, p1, atol=1e-7)


@pytest.mark.parametrize("fn,radius", ALL)
def test_edge_nan_is_a_clear_error(fn, radius):
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([1.0, float("nan"), 2.0]), radius)


@pytest.mark.parametrize("fn", [chi2_weights, kl_constrained, tv_weights, kl_weights])
def test_negative_radius_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="must lie in"):
        fn(torch.tensor([1.0, 2.0]), -0.1)


def test_chi2_large_n_is_fast_enough_and_exact():
    losses = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p, value = chi2_weights(losses, 0.1)
    # When every sample stays active the dual is variance regularisation: mean + sqrt(2 rho)·std.
    expected = losses.mean() + math.sqrt(0.2) * losses.std(unbiased=False)
    if bool((p > 0).all()):
        assert float(value) == pytest.approx(float(expected), rel=1e-9)
    assert float((p * losses).sum()) == pytest.approx(float(value), rel=1e-9)


# Fast certificates of the chi2 and KL-ball solutions (milliseconds; the SLSQP tests above take
# seconds): the value equals the 1-D dual's minimum, and the weights are the dual's worst case
# (the right shape, on the ball's boundary, a distribution) with p·l = value.


@pytest.mark.parametrize("losses", CASES)
@pytest.mark.parametrize("rho", [0.01, 0.1, 0.5, 1.0, 2.0])
def test_chi2_is_certified_by_its_dual(losses, rho):
    p, value = chi2_weights(torch.tensor(losses), rho)
    n, p = len(losses), p.numpy()
    c = math.sqrt(1 + 2 * rho)
    dual = optimize.minimize_scalar(
        lambda eta: eta + c * math.sqrt(np.mean(np.maximum(losses - eta, 0) ** 2)),
        bounds=(losses.min() - 100, losses.max()),
        method="bounded",
        options={"xatol": 1e-12},
    )
    assert float(value) == pytest.approx(dual.fun, abs=1e-7)
    excess = np.maximum(losses - dual.x, 0)
    np.testing.assert_allclose(p, excess / excess.sum(), atol=1e-5)
    assert 0.5 * n * np.sum((p - 1 / n) ** 2) == pytest.approx(rho, rel=1e-6)  # on the boundary
    assert p.min() >= 0 and p.sum() == pytest.approx(1.0, abs=1e-12)
    assert float(p @ losses) == pytest.approx(float(value), abs=1e-9)


@pytest.mark.parametrize("losses", CASES)
@pytest.mark.parametrize("eps", [0.001, 0.05, 0.3, 1.0])
def test_kl_ball_is_certified_by_its_dual(losses, eps):
    p, value = kl_constrained(torch.tensor(losses), eps)
    n, p = len(losses), p.numpy()

    def dual(log_lam):
        lam = math.exp(log_lam)
        return lam * eps + lam * (special.logsumexp(losses / lam) - math.log(n))

    res = optimize.minimize_scalar(dual, bounds=(-12, 8), method="bounded", options={"xatol": 1e-12})
    assert float(value) == pytest.approx(res.fun, abs=1e-6)
    np.testing.assert_allclose(p, special.softmax(losses / math.exp(res.x)), atol=1e-4)
    assert float(np.sum(special.xlogy(p, n * p))) == pytest.approx(eps, rel=1e-6)  # on the boundary
    tilt = np.log(p) - np.log(p[0])  # p ∝ exp(t·l): log p is affine in l
    slope = tilt[np.argmax(losses)] / (losses.max() - losses[0])
    np.testing.assert_allclose(tilt, slope * (losses - losses[0]), atol=1e-8)
    assert slope > 0 and p.sum() == pytest.approx(1.0, abs=1e-12)
    assert float(p @ losses) == pytest.approx(float(value), abs=1e-9)


@pytest.mark.parametrize("fn,radius", ALL)
def test_float32_losses_get_float32_weights_and_value(fn, radius):
    p, value = fn(torch.tensor([0.5, 2.0, 1.0]), radius)
    assert p.dtype == torch.float32 and value.dtype == torch.float32


def test_bad_losses_and_bases_are_clear_errors():
    for bad in (torch.ones(2, 2), torch.ones(0)):
        with pytest.raises(ValueError, match=rf"non-empty 1-D tensor, got shape \({bad.shape[0]},"):
            chi2_weights(bad, 0.1)
    nans = torch.tensor([0.0, math.nan, 1.0, math.inf, math.nan, math.nan, -math.inf, math.nan])
    with pytest.raises(ValueError, match=r"NaN or inf at positions \[1, 3, 4, 5, 6\];"):
        kl_weights(nans, 0.1)
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for base in ([0.5, 0.5], [0.5, 0.6, -0.1], [0.4, 0.4, 0.21], [0.5, 0.5, 0.5]):
        with pytest.raises(ValueError, match=r"^base must be a distribution with the same shape as losses$"):
            tv_weights(losses, 0.1, base=torch.tensor(base, dtype=torch.float64))
    p, _ = tv_weights(losses, 0.1, base=torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))  # zeros are fine
    assert p.tolist() == pytest.approx([0.0, 0.4, 0.6], abs=1e-12)
    p, _ = tv_weights(losses, 0.0, base=torch.tensor([0.2, 0.3, 0.5000001], dtype=torch.float64))
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-15)  # renormalized within the tolerance
    assert p.dtype == torch.float64


@pytest.mark.parametrize(
    "fn,name,upper", [(kl_weights, "tau", "inf"), (tv_weights, "rho", "1.0"), (chi2_weights, "rho", "inf")]
)
def test_radius_errors_name_the_radius_and_its_range(fn, name, upper):
    for bad in (-0.1, math.nan) + ((1.5,) if upper == "1.0" else ()):
        with pytest.raises(ValueError, match=rf"^{name} must lie in \[0, {upper}\], got"):
            fn(torch.tensor([1.0, 2.0]), bad)


def test_weighted_base_in_the_closed_forms():
    """kl and softmin with a base q: p ∝ q·exp(±l/tau), value ±tau·log E_q exp(±l/tau)."""
    losses = np.array([0.3, 2.0, -1.0, 0.7])
    q = np.array([0.1, 0.2, 0.3, 0.4])
    lt, qt = torch.tensor(losses), torch.tensor(q)
    for fn, sign in ((kl_weights, 1.0), (softmin_weights, -1.0)):
        p, value = fn(lt, 0.5, base=qt)
        expected = q * np.exp(sign * losses / 0.5)
        np.testing.assert_allclose(p.numpy(), expected / expected.sum(), atol=1e-12)
        assert float(value) == pytest.approx(sign * 0.5 * math.log(expected.sum()), abs=1e-12)


def test_ties_at_the_max_share_the_base_mass():
    """The worst case on the largest loss keeps q's proportions among the tied maxima."""
    losses = torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)
    q = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    for fn, radius in ((tv_weights, 1.0), (kl_weights, 0.0), (kl_constrained, 10.0)):
        p, value = fn(losses, radius, base=q)
        assert p.tolist() == pytest.approx([0.25, 0.0, 0.75], abs=1e-12)
        assert float(value) == pytest.approx(2.0, abs=1e-12)


def test_kl_ball_edges():
    with pytest.raises(ValueError, match=r"^radius must lie in \[0, inf\]"):
        kl_constrained(torch.tensor([1.0, 2.0]), -1.0)
    # Losses symmetric about 0 (max + min = 0) are tilted like any others.
    p, value = kl_constrained(torch.tensor([-1.0, 1.0], dtype=torch.float64), 0.1)
    kl = float(np.sum(special.xlogy(p.numpy(), 2 * p.numpy())))
    assert kl == pytest.approx(0.1, rel=1e-6) and float(value) > 0


# Aimed at the survivors of the mutation run (methods/MUTANTS.md).


def test_kl_ball_at_its_cap_is_the_max():
    """radius = -log q(argmax) exactly: the ball just reaches the point mass on the max."""
    for losses in ([0.0, 1.0], [0.0, 3.0, 1.0]):
        x = torch.tensor(losses, dtype=torch.float64)
        p, value = kl_constrained(x, -math.log(1 / len(losses)))
        assert p.tolist() == pytest.approx((x == x.max()).double().tolist(), abs=1e-12)
        assert float(value) == pytest.approx(max(losses), abs=1e-12)


@pytest.mark.parametrize(
    "fn,radius,big", [(kl_constrained, 0.1, 1e200), (chi2_weights, 0.3, 1e100), (tv_weights, 0.2, 1e200)]
)
def test_balls_are_scale_invariant(fn, radius, big):
    """Scaling the losses by c > 0 keeps the worst case and scales the value (spread 1 included).
    chi2 squares the losses, so its range is the square root of float64's."""
    losses = torch.tensor([0.0, 0.25, 1.0, 0.6, 0.3], dtype=torch.float64)  # max - min = 1 exactly
    p0, v0 = fn(losses, radius)
    assert not torch.allclose(p0, torch.full_like(p0, 0.2))  # a real reweighting, not the mean
    for c in (1 / big, 1e-12, 1e-6, 1e6, big):
        p, value = fn(c * losses, radius)
        assert torch.allclose(p, p0, rtol=1e-9, atol=1e-12), c
        assert float(value) == pytest.approx(c * float(v0), rel=1e-9, abs=0.0)


def test_kl_ball_is_shift_invariant_far_from_zero():
    """Losses near 2**50: shifting by a constant keeps the tilt (integers stay exact there)."""
    losses = torch.tensor([0.0, 1.0, 4.0, 3.0], dtype=torch.float64)
    p0, v0 = kl_constrained(losses, 0.05)
    for shift in (2.0**50, -(2.0**50)):
        p, value = kl_constrained(losses + shift, 0.05)
        assert torch.allclose(p, p0, rtol=1e-9, atol=1e-12)
        assert float(value) - shift == pytest.approx(float(v0), abs=0.5)  # the ulp at 2**50 is 0.25


@pytest.mark.parametrize("fn,radius", ALL)
def test_a_base_mass_of_zero_drops_the_sample(fn, radius):
    """A sample of base mass 0 (not the max) gets weight 0; the rest is the solve without it."""
    losses = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    p, value = fn(losses, radius, base=torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    p2, value2 = fn(torch.tensor([0.0, 2.0], dtype=torch.float64), radius)
    assert p.tolist() == pytest.approx([float(p2[0]), 0.0, float(p2[1])], abs=1e-12)
    assert float(value) == pytest.approx(float(value2), abs=1e-12)


def test_a_base_without_mass_on_the_largest_loss_is_a_clear_error():
    """Was NaN weights (tv, kl at tau 0, chi2 at a large rho) or 'math domain error' (KL ball)."""
    losses = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    base = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    for fn, radius in ((kl_constrained, 0.1), (tv_weights, 0.2), (kl_weights, 0.0), (chi2_weights, 10.0)):
        with pytest.raises(ValueError, match=r"^base gives the largest loss mass 0"):
            fn(losses, radius, base=base)
    p, _ = chi2_weights(losses, 0.3, base=base)  # a small ball stays on the base's support
    assert float(p[2]) == 0.0 and float(p.sum()) == pytest.approx(1.0, abs=1e-12)


def test_kl_ball_root_out_of_float_range_still_gives_the_value():
    """Two losses one ulp apart and an enormous spread: the tilt that reaches the radius is beyond
    1e300, and the solver stops doubling there with the value of the top pair."""
    losses = torch.tensor([1.0, 1.0 - 2.0**-52, -1e300], dtype=torch.float64)
    p, value = kl_constrained(losses, 0.6)  # between log(3/2) and log(3)
    assert float(p[2]) == 0.0 and float(p.sum()) == pytest.approx(1.0, abs=1e-15)
    assert float(value) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("eps", [1e-8, 1e-6])
def test_kl_ball_small_radius_is_on_the_boundary(eps):
    """For a tiny radius the tilt t is tiny too; the KL still meets the radius to relative
    precision (about 3e-8 at 1e-8: the rounding of KL near 0 itself)."""
    losses = CASES[0]
    p, _ = kl_constrained(torch.tensor(losses), eps)
    p = p.numpy()
    n = len(losses)
    kl = float(np.sum(p * np.log1p(p * n - 1)))
    assert kl == pytest.approx(eps, rel=1e-6, abs=0.0)


@pytest.mark.parametrize("fn,radius", ALL)
def test_a_float32_base_is_read_in_float64(fn, radius):
    losses = torch.tensor(CASES[3][:4])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float32)
    p32, v32 = fn(losses, radius, base=q)
    p64, v64 = fn(losses, radius, base=q.double())
    assert torch.equal(p32, p64) and torch.equal(v32, v64)


def test_kl_ball_of_equal_losses_at_a_radius_below_rounding():
    """Seven equal losses: sum(q) rounds below 1, so the cap is ~2e-16 > radius; still the mean."""
    p, value = kl_constrained(torch.full((7,), 2.5, dtype=torch.float64), 1e-300)
    assert p.tolist() == pytest.approx([1 / 7] * 7, abs=1e-15) and float(value) == pytest.approx(
        2.5, abs=1e-15
    )
