"""What a training loop tells the code that launched it: the evaluation callback and early stop."""

from __future__ import annotations

from collections.abc import Callable

OnEval = Callable[[int, dict], None]
"""``on_eval(iteration, scores)``, called by every loop after each evaluation."""


class StopRun(Exception):
    """Raised by an ``on_eval`` callback to stop a run early (an Optuna pruning decision)."""
