"""Training a (robust) Bradley-Terry reward model with any ``*-bt`` method.

Before training, every pair set is tokenized once (``encode_pairs``: the shared prompt's end and
each whole response in ``task.max_length`` tokens; pairs that truncation makes identical are
dropped). Per iteration: draw m pairs (seeded passes over the training set), score both sequences
with a sequence classifier (one logit; left padding so the last position is the last token), the
pointwise BT loss ``-[p log σ(r1 - r2) + (1-p) log σ(r2 - r1)]``, the method's ambiguity set (the
same aggregators as every policy method; Wasserstein perturbs the classifier's input embeddings),
one optimizer step. Evaluation: pairwise accuracy on every evaluation set; the worst case over the
OOD sets is the record's ``worst_case``, their mean ``mean_over_test`` and the ID accuracy
``train_reward``, so leaderboards and ``bench tune`` work unchanged.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

import methods
from bench.core.resources import loop_timings
from bench.loops.callbacks import OnEval
from bench.loops.config import method_radius
from bench.loops.train import PromptSampler, disable_dropout
from methods import PairScores
from methods.wasserstein import double_backprop_attention
from tasks.prefs import PairSet, PreferenceTask
from tasks.reward_model import encode, load_reward_model, rm_scores


@dataclass
class EncodedPairs:
    """A pair set as the token ids the reward model reads."""

    first: list[list[int]]
    second: list[list[int]]
    label: torch.Tensor


def encode_pairs(tok, pairs: PairSet, max_length: int, name: str) -> EncodedPairs:
    """Both responses after their shared prompt, truncated to ``max_length`` (``encode``); a pair
    whose two sequences truncation makes identical is dropped, with a warning giving the count."""
    first = encode(tok, pairs.prompt, pairs.first, max_length)
    second = encode(tok, pairs.prompt, pairs.second, max_length)
    keep = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
    if len(keep) < len(first):
        warnings.warn(
            f"{name}: {len(first) - len(keep)} of {len(first)} pairs are identical within "
            f"{max_length} tokens (task.max_length); dropped",
            RuntimeWarning,
            stacklevel=2,
        )
    return EncodedPairs([first[i] for i in keep], [second[i] for i in keep], pairs.label[keep])


def encode_sets(tok, sets: dict[str, PairSet], max_length: int, split: str) -> dict[str, EncodedPairs]:
    return {name: encode_pairs(tok, s, max_length, f"{split} set {name}") for name, s in sets.items()}


@torch.no_grad()
def accuracy(model, tok, pairs: EncodedPairs, batch: int = 64) -> float:
    hits = 0
    for lo in range(0, len(pairs.first), batch):
        a, _ = rm_scores(model, tok, pairs.first[lo : lo + batch])
        b, _ = rm_scores(model, tok, pairs.second[lo : lo + batch])
        hits += int(((a > b).double().cpu() == (pairs.label[lo : lo + batch] >= 0.5).double()).sum())
    return hits / max(1, len(pairs.first))


def evaluate(
    model, tok, test_sets: dict[str, EncodedPairs], val_sets: dict[str, EncodedPairs], id_set: str
) -> dict:
    model.eval()
    test = {name: accuracy(model, tok, s) for name, s in test_sets.items()}
    val = {name: accuracy(model, tok, s) for name, s in val_sets.items()}
    ood = {k: v for k, v in test.items() if k != id_set}
    val_ood = [v for k, v in val.items() if k != id_set] or list(val.values())
    return {
        "accuracy": test,
        "val_accuracy": val,
        "worst_case": min(ood.values()) if ood else test[id_set],
        "worst_set": min(ood, key=ood.get) if ood else id_set,
        "mean_over_test": sum(ood.values()) / len(ood) if ood else test[id_set],
        "train_reward": test[id_set],
        "val_worst_case": min(val_ood),
        "val_mean": sum(val_ood) / len(val_ood),
        "kl_ref": None,
    }


def train(cfg: DictConfig, task: PreferenceTask, run_dir: Path, on_eval: OnEval | None = None) -> dict:
    method = methods.get(cfg.method.name)
    radius, tc = method_radius(cfg), cfg.train
    model, tok = load_reward_model(task.rm_base)
    disable_dropout(model)
    device = torch.device("cuda" if torch.cuda.is_available() and tc.device != "cpu" else "cpu")
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    train_set = encode_pairs(tok, task.train, task.max_length, "training set")
    test_sets = encode_sets(tok, task.test, task.max_length, "test")
    val_sets = encode_sets(tok, task.val, task.max_length, "val")

    def evaluated() -> dict:
        return evaluate(model, tok, test_sets, val_sets, task.id_set)

    sampler = PromptSampler(len(train_set.first), cfg.seed)
    wasserstein = method.aggregator.kind == "wasserstein"
    reference = evaluated()
    curves = [{"iteration": 0, **{k: reference[k] for k in ("worst_case", "mean_over_test", "train_reward")}}]
    start, pairs_seen = time.perf_counter(), 0
    for it in range(1, tc.iterations + 1):
        idx = torch.tensor(sampler.take(tc.batch_size))
        label = train_set.label[idx].to(device)

        def losses_of(rows, idx=idx, label=label):
            ids = [train_set.first[i] for i in idx[rows]] + [train_set.second[i] for i in idx[rows]]
            with double_backprop_attention() if wasserstein else contextlib.nullcontext():
                scores, emb = rm_scores(model, tok, ids, embeds=wasserstein)
            pair = scores.view(2, -1).T.double()
            return methods.pointwise_losses(method, PairScores(pair, pref=label[rows])), [
                emb
            ] if wasserstein else []

        model.train()
        opt.zero_grad(set_to_none=True)
        stats = methods.backward_robust(
            method, radius, len(idx), losses_of, micro_batch=tc.micro_batch, w_form=cfg.method.w_form.value
        )
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        pairs_seen += len(idx)
        if it % tc.eval_every == 0 or it == tc.iterations:
            row = evaluated()
            curves.append(
                {
                    "iteration": it,
                    "robust_value": float(stats.value),
                    **{k: row[k] for k in ("worst_case", "mean_over_test", "train_reward")},
                }
            )
            if on_eval is not None:
                on_eval(it, row)
    elapsed = time.perf_counter() - start
    final = evaluated()
    if tc.save_model:
        model.save_pretrained(Path(run_dir) / "policy")
        tok.save_pretrained(Path(run_dir) / "policy")
    return {
        "metrics": final,
        "reference": reference,
        "curves": curves,
        "timings": {**loop_timings(elapsed, tc.iterations, pairs_seen), "device": str(device)},
        "model": {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())},
    }
