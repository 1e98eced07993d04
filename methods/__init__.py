"""Robust preference-optimization methods: pointwise losses x ambiguity sets.

``methods.names()`` lists the registered methods and ``methods.get(name)`` returns one.
Nothing here imports a model library beyond torch.
"""

from torch import Tensor

from methods.diagnostics import weight_diagnostics
from methods.objective import (
    GlobalWeights,
    GroupOptions,
    Objective,
    accumulate_gradients,
    backward_robust,
    global_weights,
    local_objective,
    robust_objective,
)
from methods.pointwise import PairScores
from methods.registry import (
    AGGREGATORS,
    LOSSES,
    METHODS,
    Aggregator,
    Knob,
    Method,
    register_aggregator,
    register_method,
)


def names() -> list[str]:
    """Every registered method name."""
    return METHODS.names()


def get(name: str) -> Method:
    """The method called ``name``; an unknown name raises with the list of known ones."""
    return METHODS.get(name)


def pointwise_losses(method: Method, scores: PairScores, **hparams: float | str) -> Tensor:
    """Per-pair losses of ``method`` on ``scores`` with its loss's hyperparameters."""
    return LOSSES.get(method.loss)(scores, **hparams)


__all__ = [
    "AGGREGATORS",
    "LOSSES",
    "METHODS",
    "Aggregator",
    "GlobalWeights",
    "GroupOptions",
    "Knob",
    "Method",
    "Objective",
    "PairScores",
    "accumulate_gradients",
    "backward_robust",
    "get",
    "global_weights",
    "local_objective",
    "names",
    "pointwise_losses",
    "register_aggregator",
    "register_method",
    "robust_objective",
    "weight_diagnostics",
]
