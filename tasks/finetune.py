"""The preparation stages of the paper pipelines: SFT of a policy and training of a classifier.

Plain AdamW loops over token batches (no Trainer), seeded, on the GPU when there is one.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tasks.hub import from_pretrained, load_causal_lm, reward_device


def _batches(n: int, batch: int, epochs: int, seed: int):
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for lo in range(0, n, batch):
            yield order[lo : lo + batch]


def finetune_lm(
    base: str, texts: list[str], out: Path, *, epochs: int, lr: float, batch: int, max_len: int, seed: int = 0
) -> float:
    """Supervised fine-tuning (next-token loss on whole texts, EOS appended); saves model + tokenizer."""
    torch.manual_seed(seed)
    model, tok = load_causal_lm(base)
    device = reward_device()
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    texts = [t + tok.eos_token for t in texts]
    loss = torch.tensor(float("nan"))
    for idx in _batches(len(texts), batch, epochs, seed):
        enc = tok(
            [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_len
        )
        enc = enc.to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return float(loss.detach())


def train_classifier(
    base: str,
    texts: list[str],
    labels: list[int],
    n_labels: int,
    out: Path,
    *,
    epochs: int,
    lr: float,
    batch: int,
    max_len: int,
    seed: int = 0,
) -> float:
    """A sequence classifier (softmax cross-entropy over ``n_labels``) on top of ``base``; saved."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = from_pretrained(AutoTokenizer, base, "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = from_pretrained(AutoModelForSequenceClassification, base, "classifier base", num_labels=n_labels)
    model.config.pad_token_id = tok.pad_token_id
    device = reward_device()
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    target = torch.tensor(labels)
    loss = torch.tensor(float("nan"))
    for idx in _batches(len(texts), batch, epochs, seed):
        enc = tok(
            [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_len
        )
        loss = model(**enc.to(device), labels=target[idx].to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return float(loss.detach())
