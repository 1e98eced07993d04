"""Tasks: prompt (context) sources, reward panels of K named objectives, mixture protocols.

``tasks.names()`` lists the registered tasks and ``tasks.get(name)`` returns a ``TaskSpec``. Each
task registers itself at the bottom of its own module (``tasks/registry.py`` holds the registry);
importing this package imports those modules, in the order ``bench list tasks`` shows them.
Nothing here knows which method runs.
"""

from __future__ import annotations

# The import order is the listing order; each module registers its task(s) at its bottom.
# isort: off
import tasks.linear
import tasks.lexicon
import tasks.emotion
import tasks.armorm
import tasks.hh
import tasks.prefs  # noqa: F401

# isort: on
from tasks.registry import TASKS, ModelSpec, TaskSpec, register_task

__all__ = ["TASKS", "ModelSpec", "TaskSpec", "get", "names", "register_task"]


def names() -> list[str]:
    return TASKS.names()


def get(name: str) -> TaskSpec:
    return TASKS.get(name)
