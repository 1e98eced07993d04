"""A learned reward model: a sequence classifier with one logit, scored on whole texts.

Trained by ``bench.loops.reward_model`` (any ``*-bt`` method) and used as a reward panel by the
lexicon task (``task.reward_model=FOLDER``), so its loading and scoring live here with the panels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def load_reward_model(base: str) -> tuple:
    """``(model, tokenizer)`` of a one-logit sequence classifier from a Hub name or a folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def rm_scores(model, tok, texts: list[str], max_len: int = 256, embeds: bool = False):
    """One reward per text ``[n]`` (and the input embeddings when ``embeds``, for a Wasserstein
    penalty: the caller picks the attention backend that has a double backward)."""
    enc = tok(
        texts, return_tensors="pt", padding=True, padding_side="left", truncation=True, max_length=max_len
    )
    enc = enc.to(next(model.parameters()).device)
    mask = enc["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding must not shift the positions
    if not embeds:
        return model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions).logits[
            :, 0
        ], None
    emb = model.get_input_embeddings()(enc["input_ids"])
    return model(inputs_embeds=emb, attention_mask=mask, position_ids=positions).logits[:, 0], emb


class LearnedReward:
    """A trained reward model (``bench run --task lexicon-prefs ... train.save_model=true``)."""

    def __init__(self, folder: str):
        if not (Path(folder) / "config.json").exists():
            raise ValueError(
                f"task.reward_model {folder} holds no model: train one first with `bench run --task "
                "lexicon-prefs --methods bt train.save_model=true` and pass its run folder's policy/ folder"
            )
        self.model, self.tok = load_reward_model(folder)
        self.model.eval()

    @torch.no_grad()
    def score(self, texts: list[str]) -> Tensor:
        return (
            torch.cat(
                [rm_scores(self.model, self.tok, texts[lo : lo + 64])[0] for lo in range(0, len(texts), 64)]
            )
            .double()
            .cpu()
            .view(-1, 1)
        )
