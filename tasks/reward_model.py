"""A learned reward model: a sequence classifier with one logit, scored on the token ids of a
prompt and a response tokenized apart (``encode``: the prompt's end and the whole response fit).

Trained by ``bench.loops.reward_model`` (any ``*-bt`` method) and used as a reward panel by the
lexicon task (``task.reward_model=FOLDER``), so its loading and scoring live here with the panels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from bench.core.refcache import model_fingerprint


def load_reward_model(base: str) -> tuple:
    """``(model, tokenizer)`` of a one-logit sequence classifier from a Hub name or a folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


MAX_LENGTH = 256  # tokens a reward model reads per text, unless its task says otherwise


def special_ids(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BOS, EOS, CLS/SEP), read off one probe."""
    plain = tok("x", add_special_tokens=False)["input_ids"]
    full = tok("x")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError(f"tokenizer {tok.name_or_path}: the special tokens do not wrap the text")


def truncated(prompt: list[int], response: list[int], budget: int) -> list[int]:
    """At most ``budget`` ids: the whole response after the prompt's end; the prompt is cut from the
    left first, and a response longer than the budget alone keeps its beginning."""
    response = response[:budget]
    return prompt[max(0, len(prompt) - (budget - len(response))) :] + response


def encode(tok, prompts: list[str], responses: list[str], max_length: int = MAX_LENGTH) -> list[list[int]]:
    """Token ids of each prompt + response, at most ``max_length``: prompt and response tokenized
    apart and their ids joined (the joined text is never re-tokenized), cut by ``truncated``, in the
    tokenizer's special tokens."""
    if not responses:
        return []
    before, after = special_ids(tok)
    budget = max_length - len(before) - len(after)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room beside the special tokens {before + after}")
    p = tok(prompts, add_special_tokens=False)["input_ids"]
    r = tok(responses, add_special_tokens=False)["input_ids"]
    return [before + truncated(a, b, budget) + after for a, b in zip(p, r, strict=True)]


def rm_scores(model, tok, ids: list[list[int]], embeds: bool = False):
    """One reward per token sequence ``[n]`` (and the input embeddings when ``embeds``, for a
    Wasserstein penalty: the caller picks the attention backend that has a double backward).
    Left padding, so the last position is the last token; the positions skip the padding."""
    width = max(map(len, ids))
    device = next(model.parameters()).device
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    if not embeds:
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, 0], None
    emb = model.get_input_embeddings()(input_ids)
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
        self.fingerprint = model_fingerprint(self.model)  # the folder may be trained again: its weights

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """``[n, 1]``: each prompt and response tokenized apart and cut as in training (``encode``)."""
        ids = encode(self.tok, prompts, responses)
        return (
            torch.cat(
                [rm_scores(self.model, self.tok, ids[lo : lo + 64])[0] for lo in range(0, len(ids), 64)]
            )
            .double()
            .cpu()
            .view(-1, 1)
        )
