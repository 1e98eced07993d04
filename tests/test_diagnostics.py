"""Robust diagnostics (methods.diagnostics), checked by hand and against independent dual solves."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

import methods
from methods import GlobalWeights, global_weights, weight_diagnostics
from methods.robust import chi2_solve, kl_ball_solve


def diag(name: str, p) -> dict:
    p = torch.as_tensor(p, dtype=torch.float64)
    return weight_diagnostics(methods.get(name), GlobalWeights(p, (p * 0).sum()))


@pytest.mark.parametrize("n", [1, 4, 64])
def test_uniform_weights_have_ess_n_and_entropy_log_n(n):
    d = diag("rebel", torch.full((n,), 1 / n))
    assert d["ess"] == pytest.approx(n) and d["ess_frac"] == pytest.approx(1.0)
    assert d["weight_entropy"] == pytest.approx(math.log(n), abs=1e-12)
    assert d["max_weight"] == pytest.approx(1 / n) and d["zero_weight_share"] == 0.0


def test_one_hot_weights_have_ess_one():
    d = diag("chi2-rebel", [0.0, 0.0, 1.0, 0.0, 0.0])
    assert d["ess"] == pytest.approx(1.0) and d["ess_frac"] == pytest.approx(0.2)
    assert d["max_weight"] == 1.0 and d["weight_entropy"] == 0.0 and d["zero_weight_share"] == 0.8


def test_a_small_batch_by_hand():
    # p = (1/2, 1/4, 1/4, 0): sum p^2 = 3/8, entropy = 1/2 ln 2 + 1/2 ln 4 = 1.5 ln 2
    d = diag("tv-dpo", [0.5, 0.25, 0.25, 0.0])
    assert d["ess"] == pytest.approx(8 / 3) and d["ess_frac"] == pytest.approx(2 / 3)
    assert d["weight_entropy"] == pytest.approx(1.5 * math.log(2))
    assert d["max_weight"] == 0.5 and d["zero_weight_share"] == 0.25


def test_weights_summing_to_the_batch_size_are_normalized_first():
    # GR-DPO's official update weighs samples alpha_g / share_g: about B in all.
    assert diag("gr-dpo", [2.0, 1.0, 1.0, 0.0])["ess"] == pytest.approx(8 / 3)


LOSSES = np.random.default_rng(3).gamma(2.0, 1.0, size=40)


@pytest.mark.parametrize("rho", [0.05, 0.5, 3.0])
def test_chi2_eta_is_the_minimizer_of_the_dual(rho):
    # inf_eta eta + sqrt(1 + 2 rho) sqrt(E (l - eta)_+^2), solved by scipy on its own
    c = math.sqrt(1 + 2 * rho)
    dual = lambda eta: eta + c * math.sqrt(np.mean(np.clip(LOSSES - eta, 0, None) ** 2))  # noqa: E731
    best = minimize_scalar(
        dual, bounds=(LOSSES.min() - 10, LOSSES.max()), method="bounded", options={"xatol": 1e-10}
    )
    _, value, eta = chi2_solve(torch.tensor(LOSSES), rho)
    assert eta == pytest.approx(best.x, abs=1e-6) and float(value) == pytest.approx(best.fun, rel=1e-9)


@pytest.mark.parametrize("eps", [0.01, 0.2, 1.0])
def test_kl_ball_lambda_is_the_minimizer_of_the_dual(eps):
    # inf_{lam > 0} lam eps + lam log E exp(l / lam), solved by scipy on log(lam)
    def dual(log_lam):
        lam = math.exp(log_lam)
        z = LOSSES / lam
        return lam * eps + lam * (z.max() + math.log(np.mean(np.exp(z - z.max()))))

    best = minimize_scalar(dual, bounds=(-8, 8), method="bounded", options={"xatol": 1e-12})
    _, value, lam = kl_ball_solve(torch.tensor(LOSSES), eps)
    assert lam == pytest.approx(math.exp(best.x), rel=1e-4) and float(value) == pytest.approx(
        best.fun, rel=1e-9
    )


def test_the_duals_reach_the_diagnostics_through_the_registry():
    losses = torch.tensor(LOSSES)
    chi2 = weight_diagnostics(
        methods.get("chi2-rebel"), global_weights(methods.get("chi2-rebel"), 0.5, losses)
    )
    assert chi2["dual_eta"] == pytest.approx(chi2_solve(losses, 0.5)[2])
    assert 0 < chi2["zero_weight_share"] < 1  # the chi-square ball drops the pairs below eta
    assert chi2["zero_weight_share"] == pytest.approx(float((losses <= chi2["dual_eta"]).double().mean()))
    klc = weight_diagnostics(methods.get("klc-rebel"), global_weights(methods.get("klc-rebel"), 0.2, losses))
    assert klc["dual_lambda"] == pytest.approx(kl_ball_solve(losses, 0.2)[2])
    tilted = weight_diagnostics(methods.get("kl-rebel"), global_weights(methods.get("kl-rebel"), 1.0, losses))
    assert not any(k.startswith("dual_") for k in tilted)  # penalized KL: tau is fixed, no dual to report
    assert 1 < tilted["ess"] < len(losses)


def test_the_wasserstein_penalty_and_its_share():
    losses, g = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 1.0, 4.0])
    stats = global_weights(methods.get("w-rebel"), 0.5, losses, grad_sq=g)
    d = weight_diagnostics(methods.get("w-rebel"), stats)
    assert d["w_penalty"] == pytest.approx(0.5 * math.sqrt(3.0))  # rho0 sqrt(mean g)
    assert d["w_penalty_share"] == pytest.approx(0.5 * math.sqrt(3.0) / (2.0 + 0.5 * math.sqrt(3.0)))
    assert d["ess"] == pytest.approx(3.0)


def test_group_weights_are_reported():
    losses, groups = torch.tensor([1.0, 1.0, 3.0, 3.0]), torch.tensor([0, 0, 1, 1])
    stats = global_weights(methods.get("gr-dpo"), 1.0, losses, groups=groups)
    d = weight_diagnostics(methods.get("gr-dpo"), stats)
    # alpha <- softmax(log(1/2) + [1, 3]): e^1 / (e^1 + e^3) for the first group
    assert d["group_weights"] == pytest.approx(
        [math.e / (math.e + math.e**3), math.e**3 / (math.e + math.e**3)]
    )
