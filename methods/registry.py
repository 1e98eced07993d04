"""The method algebra: a method is a pointwise loss composed with an ambiguity set.

``register_aggregator`` (decorator) adds an ambiguity set given by a weight function;
``register_method`` (one line) pairs a pointwise loss with an aggregator under a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from bench.core.registry import Registry
from methods import pointwise, robust

WeightFn = Callable[[Tensor, float], tuple]  # (weights, value) or (weights, value, dual)


@dataclass(frozen=True)
class Knob:
    """A method's radius-like hyperparameter, so that sweeps and Optuna treat all methods alike."""

    name: str
    default: float
    low: float
    high: float
    larger_is_more_robust: bool
    log: bool = True

    def validate(self, value: float | None, where: str = "") -> float:
        """The value to use (the default for None); raises naming ``where`` when out of range."""
        if value is None:
            return self.default
        value = float(value)
        if math.isnan(value) or value < 0:
            raise ValueError(f"{where or self.name} = {value}: a radius must be a non-negative number")
        if not (self.low <= value <= self.high) and not (value == 0 and self.low > 0):
            raise ValueError(
                f"{where or self.name} = {value} is outside the valid range [{self.low}, {self.high}]"
            )
        return value


@dataclass(frozen=True)
class Aggregator:
    """An ambiguity set. ``weights`` maps detached global losses to ``(p, value)``.

    ``kind`` is ``weights`` (any distribution-reweighting set), ``wasserstein`` (input-gradient
    penalty, uniform weights) or ``group`` (stateful group weights). An aggregator with a ``dual``
    maps losses to ``(p, value, dual)``, the optimal dual variable (None where undefined).
    """

    name: str
    knob: Knob | None
    weights: WeightFn | None
    kind: str = "weights"
    description: str = ""
    dual: str = ""  # the name of the dual variable ``weights`` returns third ("eta"), if any


@dataclass(frozen=True)
class Method:
    """A named pairing of a pointwise loss (``rebel``, ``dpo``, ``ipo``) and an aggregator."""

    name: str
    loss: str
    aggregator: Aggregator
    description: str
    reference: str = ""

    @property
    def knob(self) -> Knob | None:
        return self.aggregator.knob

    @property
    def strength(self) -> str | None:
        """The ``method.*`` key of the loss's regularization strength (``STRENGTHS``), or None."""
        return STRENGTHS.get(self.loss)

    @property
    def logps_at_sampling_temperature(self) -> bool:
        """Whether this loss family's official code takes log-probs of logits divided by the sampling
        temperature (``SAMPLING_TEMPERATURE_LOSSES``)."""
        return self.loss in SAMPLING_TEMPERATURE_LOSSES

    @property
    def base(self) -> str:
        """The non-robust method this one robustifies (its own name for a base method)."""
        return self.loss


# The loss families whose official code divides the policy's and the anchor's logits by the sampling
# temperature before the log-probs of a pair: REBEL (github.com/ZhaolinGao/REBEL, built on TRL's PPO
# script, which scales logits by the rollout temperature). TRL's DPOTrainer, Xu et al.'s WDPO/KLDPO,
# Dr. DPO and GR-DPO take log-probs at temperature 1, and so do IPO and the reward models here.
SAMPLING_TEMPERATURE_LOSSES = frozenset({"rebel"})

# Each loss family's regularization strength toward the reference: REBEL's step size eta (the
# regression target is (1/eta) times the log-ratio gap), DPO's and IPO's beta. Equal tuning
# searches it beside the radius; the Bradley-Terry reward model has none.
STRENGTHS = {"rebel": "eta", "dpo": "beta", "ipo": "beta"}

LOSSES: Registry[Callable] = Registry("loss")
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")
METHODS: Registry[Method] = Registry("method")

LOSSES.add("rebel", pointwise.rebel_loss)
LOSSES.add("dpo", pointwise.dpo_loss)
LOSSES.add("ipo", pointwise.ipo_loss)
LOSSES.add("bt", pointwise.bt_loss)


def register_aggregator(
    name: str, knob: Knob | None, kind: str = "weights", description: str = "", dual: str = ""
) -> Callable[[WeightFn | None], WeightFn | None]:
    """Decorator: register ``fn(losses, radius) -> (weights, value)`` as an ambiguity set (with
    ``dual`` naming it, ``fn`` returns ``(weights, value, dual)``)."""

    def register(fn: WeightFn | None) -> WeightFn | None:
        doc = description or (fn.__doc__ or "").strip()
        AGGREGATORS.add(name, Aggregator(name, knob, fn, kind, doc, dual))
        return fn

    return register


def register_method(name: str, loss: str, aggregator: str, description: str, reference: str = "") -> Method:
    """Register a method in one line: a pointwise loss name and an aggregator name."""
    LOSSES.get(loss)
    return METHODS.add(name, Method(name, loss, AGGREGATORS.get(aggregator), description, reference))


@register_aggregator("erm", None, description="empirical mean")
def _erm(losses: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    p = losses.new_full(losses.shape, 1.0 / losses.numel())
    return p, losses.mean()


register_aggregator(
    "kl",
    Knob("tau", 0.1, 1e-3, 100.0, larger_is_more_robust=False),
    description="penalized KL (tilted): softmax(l/tau)",
)(robust.kl_weights)
register_aggregator(
    "kl-ball",
    Knob("eps", 0.01, 1e-4, 10.0, larger_is_more_robust=True),
    description="KL ball of radius eps, exact 1-D dual",
    dual="lambda",
)(robust.kl_ball_solve)
register_aggregator(
    "chi2",
    Knob("rho", 0.01, 1e-4, 100.0, larger_is_more_robust=True),
    description="chi-square ball, exact O(n log n) dual",
    dual="eta",
)(robust.chi2_solve)
register_aggregator(
    "tv",
    Knob("rho", 0.1, 1e-3, 1.0, larger_is_more_robust=True),
    description="total-variation ball (CVaR-like)",
)(robust.tv_weights)
register_aggregator(
    "softmin",
    Knob("beta_prime", 1.0, 1e-2, 100.0, larger_is_more_robust=False),
    description="Dr. DPO soft-min over pairs",
)(robust.softmin_weights)
register_aggregator(
    "wasserstein",
    Knob("rho0", 0.01, 1e-5, 100.0, larger_is_more_robust=True),
    kind="wasserstein",
    description="W2 ball to first order: input-gradient penalty",
)(None)
register_aggregator(
    "group",
    Knob("eta_alpha", 0.01, 1e-5, 10.0, larger_is_more_robust=True),
    kind="group",
    description="group-robust exponentiated-gradient weights",
)(None)

REBEL_PAPER = "Sahu & Wells, arXiv 2509.19104"
DRO_DPO_PAPER = "Xu et al., arXiv 2502.01930"
for _name, _loss, _agg, _desc, _ref in [
    ("rebel", "rebel", "erm", "REBEL: regression of relative rewards", "Gao et al., arXiv 2404.16767"),
    ("w-rebel", "rebel", "wasserstein", "Wasserstein DRO-REBEL", REBEL_PAPER),
    ("kl-rebel", "rebel", "kl", "KL DRO-REBEL (penalized, detached weights)", REBEL_PAPER),
    ("klc-rebel", "rebel", "kl-ball", "KL-ball DRO-REBEL (constrained dual)", REBEL_PAPER),
    ("chi2-rebel", "rebel", "chi2", "chi-square DRO-REBEL (correct dual)", REBEL_PAPER),
    ("tv-rebel", "rebel", "tv", "TV DRO-REBEL", "Mandal et al., arXiv 2503.00539"),
    ("dpo", "dpo", "erm", "DPO", "Rafailov et al., arXiv 2305.18290"),
    ("wdpo", "dpo", "wasserstein", "Wasserstein DPO", DRO_DPO_PAPER),
    ("kldpo", "dpo", "kl", "KL DPO (normalized softmax weights)", DRO_DPO_PAPER),
    ("chi2-dpo", "dpo", "chi2", "chi-square DPO", REBEL_PAPER),
    ("tv-dpo", "dpo", "tv", "TV DRO-DPO", "Mandal et al., arXiv 2503.00539"),
    ("dr-dpo", "dpo", "softmin", "Dr. DPO (soft-min, label-noise robust)", "Wu et al., arXiv 2407.07880"),
    ("gr-dpo", "dpo", "group", "group-robust DPO", "Ramesh et al., arXiv 2405.20304"),
    ("ipo", "ipo", "erm", "IPO", "Azar et al., arXiv 2310.12036"),
    ("gr-ipo", "ipo", "group", "group-robust IPO", "Ramesh et al., arXiv 2405.20304"),
    ("bt", "bt", "erm", "Bradley-Terry reward model", "Ouyang et al., arXiv 2203.02155"),
    ("kl-bt", "bt", "kl", "KL-robust reward model", "Mandal et al., arXiv 2503.00539"),
    ("chi2-bt", "bt", "chi2", "chi-square-robust reward model", "Mandal et al., arXiv 2503.00539"),
    ("tv-bt", "bt", "tv", "TV-robust reward model (DRO-RLHF)", "Mandal et al., arXiv 2503.00539"),
    ("w-bt", "bt", "wasserstein", "Wasserstein-robust reward model", "Mandal et al., arXiv 2503.00539"),
]:
    register_method(_name, _loss, _agg, _desc, _ref)
