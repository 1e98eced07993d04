"""Leaderboard statistics that tell signal from noise (issue 20): paired, cluster-robust comparisons,
Holm-adjusted families, bootstrap rank intervals, split-half rank stability and seed-count power.

Input everywhere: a long ``scores`` frame with columns ``method, seed, prompt, value``, one row per
method x seed x test prompt, ``value`` being the per-prompt reward at the metric's chosen mixture for
that method and seed (for the headline metric, the worst-case mixture). Evaluation prompts and their
sampling streams are shared by every method of a seed (common random numbers), so two methods are
compared prompt by prompt within a seed: ``d_sp = value(a, s, p) - value(b, s, p)``.

The model in mind (and in the tests) is ``value = mu_m + u_s + v_p + w_ms + z_mp + e_msp``: ``u_s`` and
``v_p`` cancel in a paired difference; ``w_ms`` (training noise of method m at seed s) makes the
differences of one seed move together, ``z_mp`` (a prompt that suits one method) makes the differences
of one prompt move together across seeds. Hence clusters = seeds and prompts (Miller 2024,
arXiv 2411.00640), and with 3-6 seeds the seed clusters are few: see ``paired_comparison``.

Pure numpy / pandas / scipy / statsmodels; no torch.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

COLUMNS = ("method", "seed", "prompt", "value")
BETTER, WORSE = "▲", "▼"


@dataclass(frozen=True)
class Comparison:
    """``method - base``, paired within (seed, prompt). ``cluster`` names the statsmodels fit whose
    standard error was used: ``"seed"`` (one-way) or ``"seed+prompt"`` (two-way)."""

    method: str
    base: str
    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    n_prompts: int
    df: int
    cluster: str


class PairwiseMatrix(NamedTuple):
    """Two square frames over the same methods: ``estimate[r, c]`` = mean paired difference row -
    column (antisymmetric, 0 on the diagonal) and ``p_holm[r, c]`` its p-value, Holm-adjusted over
    all unordered pairs (symmetric, NaN on the diagonal)."""

    estimate: pd.DataFrame
    p_holm: pd.DataFrame


def check_scores(scores: pd.DataFrame) -> None:
    """Raise ValueError unless ``scores`` has the four columns, no missing value and one row per
    method x seed x prompt."""
    missing = set(COLUMNS) - set(scores.columns)
    if missing:
        raise ValueError(f"scores lacks columns {sorted(missing)}")
    if scores["value"].isna().any():
        raise ValueError("scores has missing values")
    if scores.duplicated(["method", "seed", "prompt"]).any():
        raise ValueError("scores has more than one row for some method x seed x prompt")


def paired_differences(scores: pd.DataFrame, method: str, base: str) -> pd.DataFrame:
    """``d_sp = value(method, s, p) - value(base, s, p)`` over the (seed, prompt) cells both methods
    have (an inner join: a cell only one of them was scored on is left out). Columns seed, prompt, d."""
    check_scores(scores)
    keep = ["seed", "prompt", "value"]
    a = scores.loc[scores["method"] == method, keep]
    b = scores.loc[scores["method"] == base, keep]
    both = a.merge(b, on=["seed", "prompt"], suffixes=("_a", "_b"), validate="one_to_one")
    if both.empty:
        raise ValueError(f"{method!r} and {base!r} share no (seed, prompt) cell")
    both["d"] = both["value_a"] - both["value_b"]
    return both[["seed", "prompt", "d"]].reset_index(drop=True)


def cluster_fits(diffs: pd.DataFrame) -> dict[str, object]:
    """OLS of ``d`` on a constant with cluster-robust (CRV1) covariance, t inference with G - 1 df:
    ``"seed"`` one-way by seed, and ``"seed+prompt"`` two-way (Cameron, Gelbach & Miller 2011:
    V = V_seed + V_prompt - V_seed∩prompt) when there are at least two prompts."""
    seed = pd.factorize(diffs["seed"])[0]
    prompt = pd.factorize(diffs["prompt"])[0]
    groups = {"seed": seed}
    if prompt.max() >= 1:
        groups["seed+prompt"] = np.column_stack([seed, prompt])
    model = sm.OLS(diffs["d"].to_numpy(dtype=float), np.ones((len(diffs), 1)))
    fits = {
        name: model.fit(cov_type="cluster", cov_kwds={"groups": g}, use_t=True) for name, g in groups.items()
    }
    with np.errstate(invalid="ignore"):  # a two-way variance can come out negative: NaN se, cached here
        for fit in fits.values():
            _ = fit.bse, fit.tvalues, fit.pvalues
    return fits


def paired_comparison(scores: pd.DataFrame, method: str, base: str, alpha: float = 0.05) -> Comparison:
    """Mean paired difference ``method - base`` with a cluster-robust, few-seed-safe test.

    Estimate: ``d̄ = (1/N) Σ_(s,p) d_sp`` over the N shared (seed, prompt) cells.

    Standard error: statsmodels' CRV1 cluster-robust SE of the OLS of d on a constant, both one-way
    by seed and two-way by seed and prompt; the LARGER of the two is used, i.e.
    ``se² = V_seed + max(0, V_prompt - V_seed∩prompt)``: the two-way estimate with its prompt term
    (the estimated variance from method x prompt effects) truncated at zero. Inference: Student t
    with ``G - 1`` df (Cameron & Miller's G - 1 rule; statsmodels' ``df_resid_inference`` with
    ``use_t=True``), G = the number of seeds (for the two-way fit min(seeds, prompts)), so 2 df at 3
    seeds. With one-way clustering and balanced cells this is exactly the one-sample t test on the
    per-seed mean differences.

    Why: null rejection rates at 5%, model of the module docstring with SD(w) = 0.5, SD(e) = 1,
    64 prompts, 20,000 simulations per cell (3 seeds / 6 seeds):

    * a normal reference over-rejects with either clustering (one-way 0.191 / 0.105): t(G - 1) it is;
    * one-way by seed, t(G - 1): exact without method x prompt effects (0.049-0.051, also with w = 0),
      but blind to them, being shared by all seeds (SD(z) = 0.3, w = 0: 0.063 / 0.096);
    * two-way, t(G - 1): covers them (0.030 / 0.035 there), but over-rejects when the seed term is weak
      (w = 0: 0.079 / 0.064; its prompt part is noise that can pull the variance down, below zero in
      4.6% of 3-seed draws);
    * the larger of the two: 0.048 / 0.047 on the model, 0.032 / 0.041 with w = 0, 0.020 / 0.032 with
      w = 0 and SD(z) = 0.3 (conservative there: the df stay G - 1 although the prompt term has more),
      and never above 0.051 in the cases tried (t(3) noise included; MC SE 0.0015). Power on the
      model at 6 seeds matches the noncentral-t power of t(G - 1): 0.797 for a planted 0.80.

    Degenerate differences (se = 0) give p = 1 if d̄ = 0 else 0, and a zero-width interval.
    """
    diffs = paired_differences(scores, method, base)
    n_seeds, n_prompts = diffs["seed"].nunique(), diffs["prompt"].nunique()
    if n_seeds < 2:
        raise ValueError("a cluster-robust comparison needs at least 2 seeds")
    fits = cluster_fits(diffs)
    cluster = max(fits, key=lambda name: np.nan_to_num(fits[name].bse[0], nan=-1.0))
    fit = fits[cluster]
    estimate, se = float(fit.params[0]), float(fit.bse[0])
    if se > 0:
        p_value = float(fit.pvalues[0])
        ci_low, ci_high = (float(x) for x in fit.conf_int(alpha)[0])
    else:
        p_value, ci_low, ci_high = float(estimate == 0), estimate, estimate
    return Comparison(
        method=method, base=base, estimate=estimate, se=se, ci_low=ci_low, ci_high=ci_high,
        p_value=p_value, n_seeds=n_seeds, n_prompts=n_prompts, df=int(fit.df_resid_inference),
        cluster=cluster,
    )  # fmt: skip


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (statsmodels ``multipletests(method="holm")``): sort the m
    p-values ascending, ``p̃_(i) = max_(j<=i) min(1, (m - j + 1) p_(j))``. Keys keep their order."""
    if not p_values:
        return {}
    adjusted = multipletests(list(p_values.values()), method="holm")[1]
    return dict(zip(p_values, (float(p) for p in adjusted), strict=True))


def methods_of(scores: pd.DataFrame) -> list[str]:
    """The methods of ``scores`` in order of first appearance."""
    return list(pd.unique(scores["method"]))


def mark_of(estimate: float, significant: bool) -> str:
    """The leaderboard mark: ▲ significantly better, ▼ significantly worse, empty otherwise."""
    if not significant or estimate == 0:
        return ""
    return BETTER if estimate > 0 else WORSE


def compare_to_base(
    scores: pd.DataFrame, base: str, methods: Sequence[str] | None = None, alpha: float = 0.05
) -> pd.DataFrame:
    """``paired_comparison(method, base)`` for every method ≠ base (default: all of ``scores``, in order
    of appearance), Holm-adjusted over that family. Index method; columns estimate, se, ci_low,
    ci_high, p, p_holm, significant (p_holm < alpha), mark, n_seeds, n_prompts, df, cluster."""
    others = [m for m in (methods_of(scores) if methods is None else methods) if m != base]
    rows = {m: paired_comparison(scores, m, base, alpha) for m in others}
    p_holm = holm({m: c.p_value for m, c in rows.items()})
    table = pd.DataFrame(
        {
            "estimate": [c.estimate for c in rows.values()],
            "se": [c.se for c in rows.values()],
            "ci_low": [c.ci_low for c in rows.values()],
            "ci_high": [c.ci_high for c in rows.values()],
            "p": [c.p_value for c in rows.values()],
            "p_holm": [p_holm[m] for m in rows],
            "n_seeds": [c.n_seeds for c in rows.values()],
            "n_prompts": [c.n_prompts for c in rows.values()],
            "df": [c.df for c in rows.values()],
            "cluster": [c.cluster for c in rows.values()],
        },
        index=pd.Index(others, name="method"),
    )
    table.insert(6, "significant", (table["p_holm"] < alpha).astype(bool))
    table.insert(
        7, "mark", [mark_of(e, s) for e, s in zip(table["estimate"], table["significant"], strict=True)]
    )
    return table


def pairwise_matrix(scores: pd.DataFrame, methods: Sequence[str]) -> PairwiseMatrix:
    """Every pair of ``methods`` by ``paired_comparison(row, column)``, Holm-adjusted over the
    m(m - 1)/2 unordered pairs: a ``PairwiseMatrix`` of two frames (estimates, adjusted p-values)."""
    methods = list(methods)
    pairs = list(itertools.combinations(methods, 2))
    found = {(a, b): paired_comparison(scores, a, b) for a, b in pairs}
    adjusted = holm({f"{a}\0{b}": c.p_value for (a, b), c in found.items()})
    estimate = pd.DataFrame(0.0, index=methods, columns=methods)
    p_holm = pd.DataFrame(np.nan, index=methods, columns=methods)
    for (a, b), c in found.items():
        estimate.loc[a, b], estimate.loc[b, a] = c.estimate, -c.estimate
        p_holm.loc[a, b] = p_holm.loc[b, a] = adjusted[f"{a}\0{b}"]
    for frame in (estimate, p_holm):
        frame.index.name, frame.columns.name = "method", "versus"
    return PairwiseMatrix(estimate, p_holm)


def score_cube(scores: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(methods, values, observed): ``values[m, s, p]`` the score (0 where absent) and ``observed`` the
    0/1 mask, over the methods (order of appearance), seeds and prompt ids of ``scores``."""
    check_scores(scores)
    m, methods = pd.factorize(scores["method"])
    s, seeds = pd.factorize(scores["seed"])
    p, prompts = pd.factorize(scores["prompt"])
    shape = (len(methods), len(seeds), len(prompts))
    values, observed = np.zeros(shape), np.zeros(shape)
    values[m, s, p] = scores["value"].to_numpy(dtype=float)
    observed[m, s, p] = 1.0
    return list(methods), values, observed


def ranks_of(means: np.ndarray) -> np.ndarray:
    """Rank along the last axis, 1 = highest; ties share the lower (better) rank:
    ``rank_m = 1 + #{k : mean_k > mean_m}``."""
    return 1 + (means[..., None, :] > means[..., :, None]).sum(axis=-1)


def resample_counts(rng: np.random.Generator, reps: int, n: int) -> np.ndarray:
    """How often each of n units is drawn in each of ``reps`` draws of n with replacement: (reps, n)."""
    counts = np.zeros((reps, n))
    np.add.at(counts, (np.arange(reps)[:, None], rng.integers(0, n, size=(reps, n))), 1.0)
    return counts


def bootstrap_means(
    values: np.ndarray, observed: np.ndarray, seed_counts: np.ndarray, prompt_counts: np.ndarray
) -> np.ndarray:
    """Each method's mean in each replicate, (reps, methods): with c_bs, k_bp the replicate's draw
    counts of seed s and prompt p (the same prompts for every method and seed, keeping the pairing),
    ``mean_bm = Σ_sp c_bs k_bp x_msp / Σ_sp c_bs k_bp o_msp``; -inf where a method drew no cell."""
    n_methods, n_seeds, n_prompts = values.shape

    def weighted(cube: np.ndarray) -> np.ndarray:
        by_prompt = prompt_counts @ cube.reshape(-1, n_prompts).T  # (reps, methods * seeds)
        by_prompt = by_prompt.reshape(-1, n_methods, n_seeds)
        return np.einsum("bs,bms->bm", seed_counts, by_prompt)

    num, den = weighted(values), weighted(observed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, -np.inf)


def rank_text(low: int, high: int) -> str:
    """The interval as text: 2 when low == high, else 1-4."""
    return f"{low}" if low == high else f"{low}-{high}"


def rank_intervals(
    scores: pd.DataFrame, reps: int = 1000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Bootstrap intervals for each method's leaderboard rank.

    point: the method's mean value over all its (seed, prompt) rows; rank: 1 + the number of methods
    with a strictly higher point (ties share the lower rank). Each of ``reps`` replicates draws the
    seeds with replacement and, once for the whole replicate, the prompt ids with replacement (the
    same prompts for every method and seed, so the common-random-number pairing is kept; a two-way
    "pigeonhole" bootstrap), recomputes every mean (``bootstrap_means``) and ranks them. rank_low /
    rank_high: the (1 - level)/2 quantile (rounded down to a drawn rank) and the (1 + level)/2
    quantile (rounded up) of the method's replicate ranks; the point rank may fall outside them.
    Index method, sorted by rank; columns point, rank, rank_low, rank_high, rank_text.
    """
    methods, values, observed = score_cube(scores)
    rng = np.random.default_rng(seed)
    seed_counts = resample_counts(rng, reps, values.shape[1])
    prompt_counts = resample_counts(rng, reps, values.shape[2])
    ranks = ranks_of(bootstrap_means(values, observed, seed_counts, prompt_counts))
    point = values.sum(axis=(1, 2)) / observed.sum(axis=(1, 2))
    low = np.quantile(ranks, (1 - level) / 2, axis=0, method="lower").astype(int)
    high = np.quantile(ranks, (1 + level) / 2, axis=0, method="higher").astype(int)
    table = pd.DataFrame(
        {"point": point, "rank": ranks_of(point), "rank_low": low, "rank_high": high},
        index=pd.Index(methods, name="method"),
    )
    table["rank_text"] = [rank_text(lo, hi) for lo, hi in zip(low, high, strict=True)]
    return table.sort_values(["rank", "point"], ascending=[True, False], kind="stable")


def seed_splits(seeds: Sequence, rng: np.random.Generator, max_splits: int) -> list[tuple[list, list]]:
    """Splits of ``seeds`` into two disjoint halves of sizes floor(n/2) and ceil(n/2): all of them
    (for even n each unordered split once) when there are at most ``max_splits``, else ``max_splits``
    random ones."""
    seeds = list(seeds)
    n, h = len(seeds), len(seeds) // 2
    if h < 1:
        raise ValueError("split halves need at least 2 seeds")
    total = math.comb(n, h) // (2 if n == 2 * h else 1)
    if total <= max_splits:
        firsts = [c for c in itertools.combinations(range(n), h) if n != 2 * h or 0 in c]
    else:
        firsts = [tuple(sorted(rng.permutation(n)[:h])) for _ in range(max_splits)]
    return [([seeds[i] for i in c], [seeds[i] for i in range(n) if i not in c]) for c in firsts]


def half_means(cells: pd.DataFrame, half: Sequence) -> pd.Series:
    """Each method's mean value over the seeds of ``half``, from per-(method, seed) sums and counts."""
    part = cells[cells.index.get_level_values("seed").isin(list(half))].groupby(level="method").sum()
    return part["sum"] / part["count"]


def split_half_tau(scores: pd.DataFrame, seed: int = 0, max_splits: int = 100) -> float:
    """Split-half stability of the leaderboard: the mean over ``seed_splits`` of Kendall's tau-b
    (scipy) between the methods' mean values on one half of the seeds and on the other (a method's
    mean over all its rows in the half; methods absent from a half are left out of that split).
    Near 1: the ranking replicates across seeds; near 0: it is noise. NaN if no split is defined."""
    check_scores(scores)
    cells = scores.groupby(["method", "seed"])["value"].agg(["sum", "count"])
    rng = np.random.default_rng(seed)
    taus = []
    for first, second in seed_splits(sorted(pd.unique(scores["seed"])), rng, max_splits):
        both = pd.concat([half_means(cells, first), half_means(cells, second)], axis=1, join="inner")
        taus.append(stats.kendalltau(both.iloc[:, 0], both.iloc[:, 1]).statistic)
    taus = np.asarray(taus, dtype=float)
    return float(np.nanmean(taus)) if np.isfinite(taus).any() else float("nan")


def seeds_for_power(scores: pd.DataFrame, a: str, b: str, power: float = 0.8, alpha: float = 0.05) -> float:
    """Seeds needed to tell ``a`` from ``b`` with probability ``power`` by a two-sided one-sample t test
    at ``alpha`` on per-seed paired differences ``D_s = mean_p (value(a, s, p) - value(b, s, p))``,
    taking their observed mean δ and standard deviation σ (ddof 1) across seeds as the truth:
    n solves ``P(|T_(n-1, δ√n/σ)| > t_(n-1, 1-alpha/2)) = power`` (statsmodels ``TTestPower``).
    inf when δ = 0 (or beyond the solver's reach); 2 (the fewest a t test can use) when σ = 0 < |δ|
    or two seeds already give the power; ValueError with 1 seed.
    Fractional: round up for a plan."""
    per_seed = paired_differences(scores, a, b).groupby("seed")["d"].mean()
    if len(per_seed) < 2:
        raise ValueError("seeds_for_power needs at least 2 seeds to estimate the seed-to-seed spread")
    delta, sigma = float(per_seed.mean()), float(per_seed.std(ddof=1))
    if delta == 0:
        return math.inf
    if sigma == 0:
        return 2.0
    effect, test = abs(delta) / sigma, TTestPower()
    at_two = test.power(effect_size=effect, nobs=2, alpha=alpha, alternative="two-sided")
    if not at_two < power:  # nan: the noncentral t's tail underflows at a large noncentrality (power 1)
        return 2.0  # already there at the fewest seeds (the root finder fails below 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels warns where it gives up: nan, read as "never"
        n = test.solve_power(effect_size=effect, nobs=None, alpha=alpha, power=power, alternative="two-sided")
    n = float(np.asarray(n).item())
    return n if math.isfinite(n) else math.inf
