"""Sentence starters written for this project: topics x frames, each frame with a tone.

360 prompts (30 topics x 12 frames). The tone of the frame (neutral, warm, tense) is the prompt's
group for group-robust methods. The split into train / validation / test is fixed by a seeded
shuffle, so every run sees the same held-out prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = [
    "the old lighthouse",
    "my grandmother's kitchen",
    "the city bus",
    "the school play",
    "the mountain trail",
    "the night market",
    "our first apartment",
    "the hospital waiting room",
    "the summer storm",
    "the football final",
    "the village bakery",
    "the job interview",
    "the empty train station",
    "the wedding party",
    "the science fair",
    "the rescue dog",
    "the flooded street",
    "the birthday letter",
    "the late shift",
    "the concert hall",
    "the garden in spring",
    "the abandoned factory",
    "the family dinner",
    "the long flight home",
    "the winter market",
    "the harbor at dawn",
    "the exam results",
    "the new neighbor",
    "the forest fire",
    "the lost suitcase",
]

FRAMES = [
    ("When I think about {t},", 0),
    ("The story of {t} begins", 0),
    ("Everyone talked about {t} because", 0),
    ("Looking back at {t}, I", 0),
    ("I will always remember {t} and", 1),
    ("Nothing made us happier than {t}, so", 1),
    ("With a smile, she described {t} as", 1),
    ("We laughed together at {t} until", 1),
    ("Nobody expected {t} to", 2),
    ("The news about {t} left us", 2),
    ("In the dark, {t} seemed", 2),
    ("He was afraid that {t} would", 2),
]


@dataclass(frozen=True)
class Prompt:
    text: str
    group: int  # tone index
    topic: int


def all_prompts() -> list[Prompt]:
    prompts = []
    for ti, topic in enumerate(TOPICS):
        for frame, tone in FRAMES:
            text = frame.format(t=topic)
            prompts.append(Prompt(text[0].upper() + text[1:], tone, ti))
    return prompts


def splits(n_val: int, n_test: int, seed: int = 20251122) -> dict[str, list[Prompt]]:
    """The fixed train / val / test split (sizes of val and test, the rest is train)."""
    prompts = all_prompts()
    if n_val + n_test >= len(prompts):
        raise ValueError(f"task.n_val + task.n_test must leave training prompts (< {len(prompts)})")
    random.Random(seed).shuffle(prompts)
    return {
        "test": prompts[:n_test],
        "val": prompts[n_test : n_test + n_val],
        "train": prompts[n_test + n_val :],
    }
