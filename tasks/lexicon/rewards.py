"""The lexicon reward panel: NRC emotion-lexicon categories plus VADER sentiment, per response.

Heads, each in [0, 1]:
* ``anger, anticipation, disgust, fear, joy, negative, positive, sadness, surprise, trust``: the
  share of the response's words listed under that NRC category, smoothed by one pseudo-word:
  ``count_c / (n_words + 1)`` (an empty response scores 0, short ones are shrunk toward 0).
  Words are lowercase ``[a-z']+`` tokens; the lexicon (6,468 words) is read from the ``nrclex``
  wheel's JSON file without importing it (its text path needs NLTK downloads).
* ``vader``: VADER's compound sentiment mapped to [0, 1]: ``(compound + 1) / 2``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

NRC = (
    "anger",
    "anticipation",
    "disgust",
    "fear",
    "joy",
    "negative",
    "positive",
    "sadness",
    "surprise",
    "trust",
)
HEADS = (*NRC, "vader")
WORD = re.compile(r"[a-z']+")


@cache
def nrc_lexicon() -> dict[str, frozenset[str]]:
    spec = importlib.util.find_spec("nrclex")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the lexicon task needs the nrclex package: pip install nrclex")
    path = Path(spec.submodule_search_locations[0]) / "data" / "nrc_en.json"
    with open(path) as f:
        return {word: frozenset(cats) for word, cats in json.load(f).items()}


@cache
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def score_text(text: str) -> list[float]:
    """The 11 head scores of one response."""
    lexicon = nrc_lexicon()
    words = WORD.findall(text.lower())
    counts = dict.fromkeys(NRC, 0)
    for word in words:
        for cat in lexicon.get(word, ()):
            if cat in counts:
                counts[cat] += 1
    denom = len(words) + 1
    compound = vader().polarity_scores(text)["compound"] if words else 0.0
    return [counts[c] / denom for c in NRC] + [(compound + 1) / 2]


def score(responses: list[str]) -> Tensor:
    """``[N, 11]`` head scores (float64)."""
    return torch.tensor([score_text(r) for r in responses], dtype=torch.float64).reshape(
        len(responses), len(HEADS)
    )
