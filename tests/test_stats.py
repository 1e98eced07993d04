"""bench.harness.stats on synthetic leaderboards with planted effects, drawn from
``value = mu_method + u_seed + v_prompt + w_(method,seed) + z_(method,prompt) + e_(method,seed,prompt)``
with prompts shared by every method and seed (common random numbers)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import optimize, stats
from statsmodels.stats.power import TTestPower

from bench.harness import stats as st

SD_W, SD_E = 0.5, 1.0  # training noise per method x seed, per-prompt noise


def simulate(
    rng: np.random.Generator,
    mu: dict[str, float],
    n_seeds: int,
    n_prompts: int,
    sd_w: float = SD_W,
    sd_e: float = SD_E,
    sd_z: float = 0.0,
) -> pd.DataFrame:
    """One leaderboard's long ``scores`` frame (seeds 0.., prompt ids "p0".. shared across seeds)."""
    n_methods = len(mu)
    value = (
        np.fromiter(mu.values(), float)[:, None, None]
        + rng.normal(0, 1.0, (1, n_seeds, 1))  # u: seed
        + rng.normal(0, 1.0, (1, 1, n_prompts))  # v: prompt difficulty, cancels in a pair
        + rng.normal(0, sd_w, (n_methods, n_seeds, 1))
        + rng.normal(0, sd_z, (n_methods, 1, n_prompts))
        + rng.normal(0, sd_e, (n_methods, n_seeds, n_prompts))
    )
    m, s, p = np.meshgrid(np.arange(n_methods), np.arange(n_seeds), np.arange(n_prompts), indexing="ij")
    return pd.DataFrame(
        {
            "method": np.asarray(list(mu))[m.ravel()],
            "seed": s.ravel(),
            "prompt": np.char.add("p", p.ravel().astype(str)),
            "value": value.ravel(),
        }
    )


def fits_of(scores: pd.DataFrame, a: str, b: str):
    """The two statsmodels OLS fits built by hand: one-way by seed, two-way by seed and prompt."""
    wide = scores.pivot_table(index=["seed", "prompt"], columns="method", values="value")
    d = (wide[a] - wide[b]).dropna()
    seed = pd.factorize(d.index.get_level_values("seed"))[0]
    prompt = pd.factorize(d.index.get_level_values("prompt"))[0]
    ols = sm.OLS(d.to_numpy(), np.ones((len(d), 1)))
    one = ols.fit(cov_type="cluster", cov_kwds={"groups": seed}, use_t=True)
    two = ols.fit(cov_type="cluster", cov_kwds={"groups": np.column_stack([seed, prompt])}, use_t=True)
    return d, one, two


# -- paired_comparison: the estimate and the statsmodels standard error ---------------------------


def test_estimate_is_the_mean_paired_difference_and_se_is_statsmodels():
    rng = np.random.default_rng(1)
    scores = simulate(rng, {"a": 0.3, "b": 0.0}, n_seeds=4, n_prompts=20)
    scores = scores.drop(index=scores.index[[3, 50, 77]])  # a few cells scored for one method only
    _, one, two = fits_of(scores, "a", "b")
    c = st.paired_comparison(scores, "a", "b")
    a_vals = scores[scores.method == "a"].set_index(["seed", "prompt"])["value"]
    b_vals = scores[scores.method == "b"].set_index(["seed", "prompt"])["value"]
    shared = a_vals.index.intersection(b_vals.index)
    assert c.estimate == pytest.approx(float((a_vals[shared] - b_vals[shared]).mean()), abs=1e-12)
    assert (c.n_seeds, c.n_prompts, c.df) == (4, 20, 3)
    fit = {"seed": one, "seed+prompt": two}[c.cluster]
    assert c.se == pytest.approx(max(one.bse[0], two.bse[0]), rel=1e-12)
    assert c.se == pytest.approx(fit.bse[0], rel=1e-12)
    assert c.p_value == pytest.approx(fit.pvalues[0], rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx(tuple(fit.conf_int(0.05)[0]), rel=1e-12)
    t = stats.t.ppf(0.975, 3)  # the G - 1 rule, by hand
    assert (c.ci_low, c.ci_high) == pytest.approx((c.estimate - t * c.se, c.estimate + t * c.se))


def test_method_by_prompt_effects_take_the_two_way_se():
    rng = np.random.default_rng(2)
    scores = simulate(rng, {"a": 0.0, "b": 0.0}, n_seeds=3, n_prompts=40, sd_w=0.0, sd_z=2.0)
    _, one, two = fits_of(scores, "a", "b")
    c = st.paired_comparison(scores, "a", "b")
    assert two.bse[0] > 2 * one.bse[0]  # shared across seeds, the prompt term is invisible by seed
    assert c.cluster == "seed+prompt" and c.se == pytest.approx(two.bse[0], rel=1e-12)


def test_paired_comparison_edge_cases():
    rng = np.random.default_rng(3)
    scores = simulate(rng, {"a": 0.0, "b": 0.0}, n_seeds=3, n_prompts=8)
    same = st.paired_comparison(scores, "a", "a")
    assert (same.estimate, same.se, same.p_value, same.ci_low, same.ci_high) == (0, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="2 seeds"):
        st.paired_comparison(scores[scores.seed == 0], "a", "b")
    with pytest.raises(ValueError, match="more than one row"):
        st.paired_comparison(pd.concat([scores, scores.head(1)]), "a", "b")
    with pytest.raises(ValueError, match="share no"):
        st.paired_comparison(scores, "a", "nobody")


# -- size and power by simulation -----------------------------------------------------------------


def rejection_rate(rng: np.random.Generator, delta: float, n_seeds: int, n_prompts: int, sims: int) -> float:
    hits = [
        st.paired_comparison(simulate(rng, {"a": delta, "b": 0.0}, n_seeds, n_prompts), "a", "b").p_value
        < 0.05
        for _ in range(sims)
    ]
    return float(np.mean(hits))


def sd_of_mean_difference(n_seeds: int, n_prompts: int) -> float:
    """SD of the estimator under ``simulate``: Var(d̄) = (2 sd_w² + 2 sd_e² / P) / S."""
    return math.sqrt((2 * SD_W**2 + 2 * SD_E**2 / n_prompts) / n_seeds)


def analytic_power(delta: float, n_seeds: int, n_prompts: int, alpha: float = 0.05) -> float:
    """Power of the two-sided t(S - 1) test: the per-seed mean differences are iid normal, so the
    statistic is noncentral t with S - 1 df and noncentrality delta / SD(d̄)."""
    df, nc = n_seeds - 1, delta / sd_of_mean_difference(n_seeds, n_prompts)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


@pytest.mark.parametrize("n_seeds", [3, 6])
def test_false_positive_rate_holds_at_five_percent(n_seeds):
    sims = 200
    rate = rejection_rate(np.random.default_rng(100 + n_seeds), 0.0, n_seeds, 64, sims)
    ci = stats.binomtest(round(rate * sims), sims).proportion_ci(0.95)  # Clopper-Pearson
    assert ci.low <= 0.05 <= ci.high, rate


def test_planted_difference_is_found_at_the_analytic_power():
    n_seeds, n_prompts = 6, 64
    delta = optimize.brentq(lambda x: analytic_power(x, n_seeds, n_prompts) - 0.8, 0.01, 2.0)
    assert SD_W / 4 < delta < 4 * SD_W  # the effect is comparable to the training noise
    rate = rejection_rate(np.random.default_rng(7), delta, n_seeds, n_prompts, 200)
    assert abs(rate - 0.8) < 0.12, rate


# -- Holm, the table against a base and the pairwise matrix ---------------------------------------


def test_holm_matches_a_hand_computation():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    adjusted = st.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert list(adjusted) == ["a", "b", "c"]
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert st.holm({}) == {}
    assert st.holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})


def test_compare_to_base_marks_better_worse_and_tied():
    rng = np.random.default_rng(4)
    mu = {"base": 0.0, "up": 3.0, "down": -3.0, "same": 0.0}
    table = st.compare_to_base(simulate(rng, mu, n_seeds=5, n_prompts=32), "base")
    assert list(table.index) == ["up", "down", "same"]
    assert table["mark"].tolist() == ["▲", "▼", ""]
    assert table["significant"].tolist() == [True, True, False]
    assert table["p_holm"].tolist() == pytest.approx(list(st.holm(table["p"].to_dict()).values()))
    assert (table["ci_low"] < table["estimate"]).all() and (table["estimate"] < table["ci_high"]).all()
    assert list(st.compare_to_base(simulate(rng, mu, 3, 8), "base", methods=["same"]).index) == ["same"]


def test_pairwise_matrix_is_antisymmetric_and_holm_adjusted_over_all_pairs():
    rng = np.random.default_rng(5)
    mu = {"a": 0.0, "b": 0.5, "c": 2.0, "d": 2.0}
    scores = simulate(rng, mu, n_seeds=4, n_prompts=16)
    est, p_holm = st.pairwise_matrix(scores, list(mu))
    assert np.allclose(est.to_numpy(), -est.to_numpy().T) and (np.diag(est) == 0).all()
    assert np.isnan(np.diag(p_holm)).all()
    assert np.allclose(p_holm.fillna(0).to_numpy(), p_holm.fillna(0).to_numpy().T)
    raw = {
        f"{a}{b}": st.paired_comparison(scores, a, b).p_value
        for a, b in [(a, b) for a in mu for b in mu if a < b]
    }
    assert {f"{a}{b}": p_holm.loc[a, b] for a in mu for b in mu if a < b} == pytest.approx(st.holm(raw))
    assert est.loc["c", "a"] == pytest.approx(st.paired_comparison(scores, "c", "a").estimate)


# -- rank intervals -------------------------------------------------------------------------------


def test_rank_intervals_separate_a_clear_winner_and_overlap_twins():
    rng = np.random.default_rng(6)
    mu = {"top": 10.0, "twin1": 0.0, "twin2": 0.0, "low": -10.0}
    scores = simulate(rng, mu, n_seeds=4, n_prompts=32)
    table = st.rank_intervals(scores, reps=500)
    assert list(table.index) == [
        "top",
        *sorted(["twin1", "twin2"], key=lambda m: table.loc[m, "rank"]),
        "low",
    ]
    assert table.loc["top", "rank_text"] == "1" and table.loc["low", "rank_text"] == "4"
    t1, t2 = table.loc["twin1"], table.loc["twin2"]
    assert max(t1.rank_low, t2.rank_low) <= min(t1.rank_high, t2.rank_high)
    assert (t1.rank_text, t2.rank_text) == ("2-3", "2-3")
    assert table["point"].to_dict() == pytest.approx(scores.groupby("method")["value"].mean().to_dict())


def test_rank_intervals_keep_the_prompt_pairing_and_share_tied_ranks():
    # b trails a by 0.01 on every prompt while prompt difficulty varies by ±3: with the same
    # resampled prompts for both, a wins every replicate; tied methods share the better rank.
    rng = np.random.default_rng(8)
    a = simulate(rng, {"a": 0.0}, n_seeds=3, n_prompts=30, sd_w=0.0, sd_e=3.0)
    b = a.assign(method="b", value=a["value"] - 0.01)
    tie = a.assign(method="tie")
    table = st.rank_intervals(pd.concat([a, b, tie]), reps=300)
    assert table.loc["b", "rank_text"] == "3"
    assert table.loc[["a", "tie"], "rank_text"].tolist() == ["1", "1"]
    assert table.loc[["a", "tie"], "rank"].tolist() == [1, 1]


def test_bootstrap_means_match_a_loop_over_replicates():
    rng = np.random.default_rng(9)
    scores = simulate(rng, {"a": 0.0, "b": 1.0, "c": 0.5}, n_seeds=3, n_prompts=7)
    scores = scores.drop(index=scores.index[[0, 11, 30]])  # a ragged cube
    methods, values, observed = st.score_cube(scores)
    draws = np.random.default_rng(0)
    seed_idx, prompt_idx = draws.integers(0, 3, (20, 3)), draws.integers(0, 7, (20, 7))
    seed_counts = np.stack([np.bincount(i, minlength=3) for i in seed_idx]).astype(float)
    prompt_counts = np.stack([np.bincount(i, minlength=7) for i in prompt_idx]).astype(float)
    fast = st.bootstrap_means(values, observed, seed_counts, prompt_counts)
    for r in range(20):
        cells = np.ix_(range(len(methods)), seed_idx[r], prompt_idx[r])
        x, o = values[cells], observed[cells]
        assert fast[r] == pytest.approx(x.sum(axis=(1, 2)) / o.sum(axis=(1, 2)))
    counts = st.resample_counts(np.random.default_rng(0), 50, 4)
    assert counts.shape == (50, 4) and (counts.sum(axis=1) == 4).all()


# -- split-half tau -------------------------------------------------------------------------------


def test_seed_splits_cover_every_split_once():
    rng = np.random.default_rng(0)
    even = st.seed_splits([0, 1, 2, 3], rng, max_splits=100)
    assert len(even) == 3 and all(len(x) == len(y) == 2 for x, y in even)
    assert len({frozenset(x) for x, _ in even} | {frozenset(y) for _, y in even}) == 6
    odd = st.seed_splits([0, 1, 2, 3, 4], rng, max_splits=100)
    assert len(odd) == 10 and all((len(x), len(y)) == (2, 3) for x, y in odd)
    assert len(st.seed_splits(list(range(12)), rng, max_splits=7)) == 7
    with pytest.raises(ValueError):
        st.seed_splits([0], rng, 10)


def test_split_half_tau_is_near_one_for_separated_methods_and_near_zero_for_noise():
    rng = np.random.default_rng(10)
    separated = {f"m{i}": 2.0 * i for i in range(8)}
    assert st.split_half_tau(simulate(rng, separated, n_seeds=5, n_prompts=16)) > 0.95
    noise = {f"m{i}": 0.0 for i in range(12)}
    taus = [st.split_half_tau(simulate(rng, noise, n_seeds=6, n_prompts=16)) for _ in range(10)]
    assert abs(np.mean(taus)) < 0.1, taus


# -- seeds for power ------------------------------------------------------------------------------


def test_seeds_for_power_matches_solve_power_on_a_hand_built_case():
    # per-seed mean differences 0.5, 1.0, 1.5 (the ±0.2 prompt wiggle averages out within a seed)
    wiggle = np.array([0.2, -0.2, 0.2, -0.2])
    rows = [
        {"method": m, "seed": s, "prompt": p, "value": (d + wiggle[p]) if m == "a" else 0.0}
        for s, d in enumerate([0.5, 1.0, 1.5])
        for p in range(4)
        for m in ("a", "b")
    ]
    scores = pd.DataFrame(rows)
    expected = TTestPower().solve_power(effect_size=1.0 / 0.5, alpha=0.05, power=0.8, alternative="two-sided")
    assert st.seeds_for_power(scores, "a", "b") == pytest.approx(float(expected))
    assert st.seeds_for_power(scores, "b", "a") == pytest.approx(float(expected))
    flat = scores.assign(value=scores["value"].where(scores.method == "b", wiggle[scores.prompt]))
    assert st.seeds_for_power(flat, "a", "b") == math.inf
    with pytest.raises(ValueError, match="2 seeds"):
        st.seeds_for_power(scores[scores.seed == 0], "a", "b")


def test_seeds_for_power_at_a_huge_effect_is_two():
    """delta / sigma = 21 on three seeds: two seeds already give the power (statsmodels' noncentral t
    returns nan there, which must not read as "never")."""
    values = [-0.2, -0.21, -0.205, -0.3, -0.32, -0.31]
    scores = pd.DataFrame(
        {"method": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "prompt": 0, "value": values}
    )
    assert st.seeds_for_power(scores, "a", "b") == 2.0
