"""The radius-coverage study: divergences, the robust estimator, slopes, the sweep file."""

import math
from pathlib import Path

import numpy as np
import pytest

from bench.loops.config import ConfigError
from bench.studies.coverage import (
    CoverageConfig,
    divergence,
    load_study,
    make_instance,
    robust_estimate,
    run_study,
)

SWEEP = Path(__file__).resolve().parent.parent / "sweeps" / "radius-coverage.yaml"


def test_divergences_by_hand():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    assert divergence("chi2", p, q) == pytest.approx(0.5 * (0.01 / 0.4 + 0.01 / 0.4))
    assert divergence("kl", p, q) == pytest.approx(0.5 * math.log(1.25) + 0.3 * math.log(0.75))
    assert divergence("kl", p, np.array([0.5, 0.5, 0.0])) == math.inf


def test_robust_estimator_minimizes_the_worst_case_loss():
    inst = make_instance(CoverageConfig(atoms=6, d=2))
    base = inst.p_true
    theta = robust_estimate("chi2", inst.x, inst.y, base, 0.3)
    import torch

    from methods.robust import chi2_weights

    def robust_value(t):
        return float(
            chi2_weights(torch.from_numpy((inst.x @ t - inst.y) ** 2), 0.3, base=torch.from_numpy(base))[1]
        )

    best = robust_value(theta)
    grid = np.linspace(-0.05, 0.05, 11)
    for dx in grid:
        for dy in grid:
            assert robust_value(theta + np.array([dx, dy])) >= best - 1e-9
    erm = robust_estimate("chi2", inst.x, inst.y, base, 0.0)
    np.testing.assert_allclose(erm, inst.theta_star, atol=1e-8)


def test_small_study_measures_slopes_and_coverage(tmp_path):
    cfg = CoverageConfig(
        divergences=["kl"], n=[100, 1000, 10000], exponents=[0.5, 2.0], trials=8, atoms=6, bootstrap=200
    )
    result = run_study(cfg, tmp_path)
    slopes = result.slopes.set_index(["divergence", "a"])
    erm = slopes.loc[("erm", slopes.loc["erm"].index[0])]
    assert erm.ci_low < -0.3 and erm.ci_high > -0.75  # the parametric rate, as measured
    assert slopes.loc[("kl", 2.0)].coverage_large_n == 0.0  # radius shrinks faster than D concentrates
    assert slopes.loc[("kl", 0.5)].coverage_large_n == 1.0
    assert (result.folder / "table.md").read_text().startswith("| divergence")


def test_sweep_file_validates_and_bad_keys_are_named(tmp_path):
    cfg = load_study(SWEEP)
    assert max(cfg.n) / min(cfg.n) >= 100 and len(cfg.exponents) >= 3
    with pytest.raises(ConfigError, match="bogus"):
        load_study(SWEEP, ["bogus=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: [100, 200]\n")
    with pytest.raises(ConfigError, match="two decades"):
        load_study(bad)
