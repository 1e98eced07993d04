"""The radius-coverage study: parameter error, coverage and worst-case risk against n and eps_n.

Setting (methods.md §8.2, the DRO-REBEL linear regime with eta = 1, theta_ref = 0): a triple is an
atom j of a finite support with feature difference ``x_j`` and mean relative reward ``mu_j`` (linear
in ``x_j`` plus a misspecified part), observed with Rademacher noise ``±sigma``; the support is the
``2k`` (atom, sign) points. The REBEL loss is ``l(theta; j, s) = (theta·x_j - mu_j - s·sigma)^2``.
For each n and radius ``eps_n = c·2k·n^-a`` the robust estimator
``argmin_theta sup_{D(P||P_n) <= eps_n} E_P l`` is computed exactly (the dual value is convex in
theta; L-BFGS with the envelope gradient). Measured per trial: ``||theta_n - theta*||`` with
``theta*`` the population least-squares parameter, coverage ``1[D(P_true||P_n) <= eps_n]``, and the
worst-case risk over fixed shifted test distributions. Log-log slopes of the mean parameter error
against n get percentile-bootstrap CIs over trials.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy import optimize

from bench.harness.records import write_json_atomic
from bench.loops.config import ConfigError
from methods.robust import chi2_weights, kl_constrained

SOLVERS = {"chi2": chi2_weights, "kl": kl_constrained}


@dataclass
class CoverageConfig:
    divergences: list[str] = field(default_factory=lambda: ["chi2", "kl"])
    n: list[int] = field(default_factory=lambda: [100, 300, 1000, 3000, 10000])
    exponents: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    c_scale: float = 1.0
    trials: int = 50
    atoms: int = 12
    d: int = 4
    noise: float = 0.5
    misspec: float = 0.5
    shifts: int = 32
    shift_strength: float = 1.0
    bootstrap: int = 1000
    seed: int = 0

    def validate(self) -> None:
        unknown = sorted(set(self.divergences) - set(SOLVERS))
        if unknown or not self.divergences:
            raise ConfigError(f"divergences: unknown {unknown}; known: {', '.join(SOLVERS)}")
        if len(self.n) < 2 or min(self.n) < 1 or max(self.n) / min(self.n) < 100:
            raise ConfigError(f"n must span at least two decades, got {list(self.n)}")
        if not self.exponents or min(self.exponents) <= 0:
            raise ConfigError(f"exponents must be positive, got {list(self.exponents)}")
        for key in ("trials", "atoms", "d", "shifts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1")


def load_study(path: Path, overrides: list[str] = ()) -> CoverageConfig:
    """The study config from a YAML sweep file plus ``key=value`` overrides (typed, validated)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no sweep file at {path}")
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(CoverageConfig),
            OmegaConf.load(path),
            OmegaConf.from_dotlist(list(overrides)),
        )
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    study = OmegaConf.to_object(cfg)
    study.validate()
    return study


@dataclass
class Instance:
    """The true distribution over the 2k support points and its losses' ingredients."""

    x: np.ndarray  # [2k, d] feature differences
    y: np.ndarray  # [2k] observed relative rewards
    p_true: np.ndarray  # [2k]
    theta_star: np.ndarray  # population least squares under p_true
    shifts: np.ndarray  # [S, 2k] shifted test distributions


def make_instance(cfg: CoverageConfig) -> Instance:
    rng = np.random.default_rng(cfg.seed)
    k, d = cfg.atoms, cfg.d
    x_atoms = rng.normal(size=(k, d)) / math.sqrt(d)
    omega = rng.normal(size=d)
    mu = x_atoms @ omega + cfg.misspec * rng.normal(size=k)
    q_atoms = rng.dirichlet(np.full(k, 2.0))
    x = np.concatenate([x_atoms, x_atoms])
    y = np.concatenate([mu + cfg.noise, mu - cfg.noise])
    p_true = np.concatenate([q_atoms, q_atoms]) / 2
    theta_star = np.linalg.solve(x.T @ (p_true[:, None] * x), x.T @ (p_true * y))
    tilts = rng.normal(size=(cfg.shifts, k))
    shifted = q_atoms * np.exp(cfg.shift_strength * tilts)
    shifted /= shifted.sum(1, keepdims=True)
    return Instance(x, y, p_true, theta_star, np.concatenate([shifted, shifted], 1) / 2)


def divergence(name: str, p: np.ndarray, q: np.ndarray) -> float:
    """``D(p||q)`` on a finite support: chi2 = 0.5·E_q[(p/q - 1)^2], KL; inf unless p << q."""
    if np.any((q == 0) & (p > 0)):
        return math.inf
    m = q > 0
    if name == "chi2":
        return float(0.5 * np.sum((p[m] - q[m]) ** 2 / q[m]))
    pm = p[m]
    return float(np.sum(np.where(pm > 0, pm * np.log(np.where(pm > 0, pm, 1) / q[m]), 0.0)))


def robust_estimate(name: str, x: np.ndarray, y: np.ndarray, base: np.ndarray, eps: float) -> np.ndarray:
    """``argmin_theta sup_{D(P||base) <= eps} E_P (theta·x - y)^2`` (convex; L-BFGS, envelope grad)."""
    xt, yt, bt = (torch.from_numpy(a) for a in (x, y, base))
    solve = SOLVERS[name]

    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        resid = xt @ torch.from_numpy(theta) - yt
        p, value = solve(resid**2, eps, base=bt) if eps > 0 else (bt, (bt * resid**2).sum())
        return float(value), (2 * (p * resid) @ xt).numpy()

    start = np.linalg.lstsq(np.sqrt(base)[:, None] * x, np.sqrt(base) * y, rcond=None)[0]
    res = optimize.minimize(
        value_and_grad,
        start,
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 500},
    )
    return res.x


def worst_risk(inst: Instance, theta: np.ndarray) -> float:
    return float(np.max(inst.shifts @ (inst.x @ theta - inst.y) ** 2))


@dataclass
class StudyResult:
    trials: pd.DataFrame
    slopes: pd.DataFrame
    table: str
    folder: Path


def run_trials(cfg: CoverageConfig, inst: Instance) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed + 1)
    support = len(inst.p_true)
    rows = []
    for n in cfg.n:
        for trial in range(cfg.trials):
            counts = rng.multinomial(n, inst.p_true)
            seen = counts > 0
            base = counts[seen] / n
            p_hat = counts / n
            theta_erm = robust_estimate("chi2", inst.x[seen], inst.y[seen], base, 0.0)
            rows.append(
                {
                    "divergence": "erm",
                    "a": math.nan,
                    "n": n,
                    "trial": trial,
                    "eps": 0.0,
                    "param_error": float(np.linalg.norm(theta_erm - inst.theta_star)),
                    "covered": math.nan,
                    "worst_risk": worst_risk(inst, theta_erm),
                }
            )
            for name in cfg.divergences:
                dist = divergence(name, inst.p_true, p_hat)
                for a in cfg.exponents:
                    eps = cfg.c_scale * support * n ** (-a)
                    theta = robust_estimate(name, inst.x[seen], inst.y[seen], base, eps)
                    rows.append(
                        {
                            "divergence": name,
                            "a": a,
                            "n": n,
                            "trial": trial,
                            "eps": eps,
                            "param_error": float(np.linalg.norm(theta - inst.theta_star)),
                            "covered": float(dist <= eps),
                            "worst_risk": worst_risk(inst, theta),
                        }
                    )
    return pd.DataFrame(rows)


def fit_slopes(trials: pd.DataFrame, reps: int, seed: int) -> pd.DataFrame:
    """Slope of log(mean parameter error) on log n per schedule, with a bootstrap 95% CI."""
    rng = np.random.default_rng(seed)
    out = []
    for (name, a), grp in trials.groupby(["divergence", "a"], dropna=False):
        ns = np.array(sorted(grp.n.unique()))
        errors = [grp[grp.n == n].param_error.to_numpy() for n in ns]
        logn = np.log(ns)

        def slope(means: list[float], logn: np.ndarray = logn) -> float:
            return float(np.polyfit(logn, np.log(means), 1)[0])

        point = slope([e.mean() for e in errors])
        boot = [slope([rng.choice(e, e.size).mean() for e in errors]) for _ in range(reps)]
        cov = grp.groupby("n").covered.mean()
        out.append(
            {
                "divergence": name,
                "a": a,
                "slope": point,
                "ci_low": float(np.percentile(boot, 2.5)),
                "ci_high": float(np.percentile(boot, 97.5)),
                "coverage_small_n": float(cov.iloc[0]),
                "coverage_large_n": float(cov.iloc[-1]),
                "error_large_n": float(errors[-1].mean()),
                "worst_risk_large_n": float(grp[grp.n == ns[-1]].worst_risk.mean()),
            }
        )
    return pd.DataFrame(out)


def format_slopes(slopes: pd.DataFrame, cfg: CoverageConfig) -> str:
    shown = slopes.copy()
    shown["schedule"] = [
        "eps = 0 (ERM)" if name == "erm" else f"eps = {cfg.c_scale:g}·{2 * cfg.atoms}·n^-{a:g}"
        for name, a in zip(shown.divergence, shown.a, strict=True)
    ]
    shown["slope [95% CI]"] = [
        f"{s:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        for s, lo, hi in zip(shown.slope, shown.ci_low, shown.ci_high, strict=True)
    ]
    lo, hi = min(cfg.n), max(cfg.n)
    shown = shown.rename(
        columns={
            "coverage_small_n": f"coverage n={lo}",
            "coverage_large_n": f"coverage n={hi}",
            "error_large_n": f"error n={hi}",
            "worst_risk_large_n": f"worst risk n={hi}",
        }
    )
    cols = [
        "divergence",
        "schedule",
        "slope [95% CI]",
        f"coverage n={lo}",
        f"coverage n={hi}",
        f"error n={hi}",
        f"worst risk n={hi}",
    ]
    return shown[cols].to_markdown(index=False, floatfmt=".3f")


def run_study(cfg: CoverageConfig, results: Path) -> StudyResult:
    """Run every trial, fit the slopes, write trials.csv, slopes.csv, table.md and study.json."""
    inst = make_instance(cfg)
    trials = run_trials(cfg, inst)
    slopes = fit_slopes(trials, cfg.bootstrap, cfg.seed + 2)
    table = format_slopes(slopes, cfg)
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(results) / "radius-coverage" / key
    folder.mkdir(parents=True, exist_ok=True)
    trials.to_csv(folder / "trials.csv", index=False)
    slopes.to_csv(folder / "slopes.csv", index=False)
    (folder / "table.md").write_text(table + "\n")
    write_json_atomic(folder / "study.json", {"config": asdict(cfg), "slopes": slopes.to_dict("records")})
    return StudyResult(trials, slopes, table, folder)
