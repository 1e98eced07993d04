"""Text the project generates to pretrain the tiny policies: starters + templated continuations.

Each sentence is a prompt starter followed by a template whose slots are filled with a neutral
word (half the time) or a word of a uniformly chosen NRC category, so the pretrained policy emits
emotional words at a moderate base rate that alignment can move.
"""

from __future__ import annotations

import random

from tasks.lexicon.prompts import all_prompts
from tasks.lexicon.rewards import NRC, nrc_lexicon

NEUTRAL = """
table window street paper river morning evening chair road door house letter city market garden
train station kitchen corner bridge field car bus phone book window box light wall floor roof
shop coat cup bread water stone tree hill town square wind rain cloud sun path room bag key
clock picture map ticket bottle plate glass shirt hat bench fence boat truck bike desk lamp
walked talked looked waited opened closed carried moved turned called wrote read noticed slowly
quietly suddenly later again outside inside almost nearly really quite often always blue green
yellow small large quiet busy warm cold long short early late new old simple
""".split()  # noqa: SIM905 (a word list reads best as text)

TEMPLATES = [
    " the {} was {} and {}.",
    " i felt {} when the {} came {}.",
    " we found a {} {} near the {}.",
    " it was so {}, like a {} in the {}.",
    " there was {} {} and {} {} everywhere.",
    " my {} {} the {} {}.",
    " nobody could {} the {} {}.",
    " she said the {} looked {} and {}.",
    " everything felt {} after the {}.",
    " they {} the {} with {} {}.",
]


def words_by_category() -> dict[str, list[str]]:
    lexicon = nrc_lexicon()
    return {c: sorted(w for w, cats in lexicon.items() if c in cats and "'" not in w) for c in NRC}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    starters = [p.text for p in all_prompts()]
    by_cat = words_by_category()

    def word() -> str:
        if rng.random() < 0.5:
            return rng.choice(NEUTRAL)
        return rng.choice(by_cat[rng.choice(NRC)])

    out = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        out.append(rng.choice(starters) + template.format(*(word() for _ in range(template.count("{}")))))
    return out
