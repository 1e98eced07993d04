"""Training a (robust) Bradley-Terry reward model with any ``*-bt`` method.

Per iteration: draw m pairs (seeded passes over the training set), score both texts with a
sequence classifier (one logit; left padding so the last position is the last token), the
pointwise BT loss ``-[p log σ(r1 - r2) + (1-p) log σ(r2 - r1)]``, the method's ambiguity set (the
same aggregators as every policy method; Wasserstein perturbs the classifier's input embeddings),
one optimizer step. Evaluation: pairwise accuracy on every evaluation set; the worst case over the
OOD sets is the record's ``worst_case``, their mean ``mean_over_test`` and the ID accuracy
``train_reward``, so leaderboards and ``bench tune`` work unchanged.
"""

from __future__ import annotations

import contextlib
import time
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
from tasks.reward_model import load_reward_model, rm_scores


@torch.no_grad()
def accuracy(model, tok, pairs: PairSet, batch: int = 64) -> float:
    hits = 0
    for lo in range(0, len(pairs.first), batch):
        a, _ = rm_scores(model, tok, pairs.first[lo : lo + batch])
        b, _ = rm_scores(model, tok, pairs.second[lo : lo + batch])
        hits += int(((a > b).double().cpu() == (pairs.label[lo : lo + batch] >= 0.5).double()).sum())
    return hits / max(1, len(pairs.first))


def evaluate(model, tok, task: PreferenceTask) -> dict:
    model.eval()
    test = {name: accuracy(model, tok, s) for name, s in task.test.items()}
    val = {name: accuracy(model, tok, s) for name, s in task.val.items()}
    ood = {k: v for k, v in test.items() if k != task.id_set}
    val_ood = [v for k, v in val.items() if k != task.id_set] or list(val.values())
    return {
        "accuracy": test,
        "val_accuracy": val,
        "worst_case": min(ood.values()) if ood else test[task.id_set],
        "worst_set": min(ood, key=ood.get) if ood else task.id_set,
        "mean_over_test": sum(ood.values()) / len(ood) if ood else test[task.id_set],
        "train_reward": test[task.id_set],
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
    sampler = PromptSampler(len(task.train.first), cfg.seed)
    wasserstein = method.aggregator.kind == "wasserstein"
    reference = evaluate(model, tok, task)
    curves = [{"iteration": 0, **{k: reference[k] for k in ("worst_case", "mean_over_test", "train_reward")}}]
    start, pairs_seen = time.perf_counter(), 0
    for it in range(1, tc.iterations + 1):
        idx = torch.tensor(sampler.take(tc.batch_size))
        label = task.train.label[idx].to(device)

        def losses_of(rows, idx=idx, label=label):
            texts = [task.train.first[i] for i in idx[rows]] + [task.train.second[i] for i in idx[rows]]
            with double_backprop_attention() if wasserstein else contextlib.nullcontext():
                scores, emb = rm_scores(model, tok, texts, embeds=wasserstein)
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
            row = evaluate(model, tok, task)
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
    final = evaluate(model, tok, task)
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
