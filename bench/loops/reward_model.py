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
from bench.loops.monitor import Monitor
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
def correct(model, tok, pairs: EncodedPairs, batch: int = 64) -> list[int]:
    """1 where the model ranks a pair as its label does (first preferred iff label >= 0.5), else 0."""
    hits: list[int] = []
    for lo in range(0, len(pairs.first), batch):
        a, _ = rm_scores(model, tok, pairs.first[lo : lo + batch])
        b, _ = rm_scores(model, tok, pairs.second[lo : lo + batch])
        hits += ((a > b).cpu() == (pairs.label[lo : lo + batch] >= 0.5)).int().tolist()
    return hits


def evaluate(
    model, tok, test_sets: dict[str, EncodedPairs], val_sets: dict[str, EncodedPairs], id_set: str
) -> dict:
    """Accuracies per set; ``per_pair`` keeps each test pair's 0/1 (the same pairs for every method
    of a task config, so methods compare pair by pair), and ``worst_case_selected`` is the test
    accuracy of the OOD set that is worst on validation (no winner's curse from the test minimum)."""
    model.eval()
    hits = {name: correct(model, tok, s) for name, s in test_sets.items()}
    test = {name: sum(h) / max(1, len(h)) for name, h in hits.items()}
    val = {
        name: sum(h) / max(1, len(h))
        for name, h in ((n, correct(model, tok, s)) for n, s in val_sets.items())
    }
    ood = {k: v for k, v in test.items() if k != id_set}
    val_ood = {k: v for k, v in val.items() if k != id_set} or val
    selected = min((k for k in val_ood if k in test), key=val_ood.get, default=None)
    return {
        "accuracy": test,
        "val_accuracy": val,
        "worst_case": min(ood.values()) if ood else test[id_set],
        "worst_set": min(ood, key=ood.get) if ood else id_set,
        "mean_over_test": sum(ood.values()) / len(ood) if ood else test[id_set],
        "train_reward": test[id_set],
        "val_worst_case": min(val_ood.values()),
        "val_mean": sum(val_ood.values()) / len(val_ood),
        "kl_ref": None,
        "per_pair": hits,
        "selected_set": selected,
        "worst_case_selected": test[selected] if selected else None,
    }


def train(
    cfg: DictConfig,
    task: PreferenceTask,
    run_dir: Path,
    on_eval: OnEval | None = None,
    monitor: Monitor | None = None,
) -> dict:
    """Train one reward model (no checkpoints); live metrics to ``monitor``."""
    monitor = monitor or Monitor(run_dir)
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
    steps = []
    monitor.start(tc.iterations)
    monitor.evaluation(0, reference)
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
        step = {"robust_value": float(stats.value), **methods.weight_diagnostics(method, stats)}
        steps.append({"iteration": it, **step})
        monitor.iteration(it, step)
        if it % tc.eval_every == 0 or it == tc.iterations:
            row = evaluated()
            shown = {k: row[k] for k in ("worst_case", "mean_over_test", "train_reward")}
            curves.append({"iteration": it, **step, **shown})
            monitor.evaluation(it, row)
            if on_eval is not None:
                on_eval(it, row)
    elapsed = time.perf_counter() - start
    final = evaluated()
    monitor.finish(final)
    if tc.save_model:
        model.save_pretrained(Path(run_dir) / "policy")
        tok.save_pretrained(Path(run_dir) / "policy")
    return {
        "metrics": final,
        "reference": reference,
        "curves": curves,
        "steps": steps,
        "timings": {**loop_timings(elapsed, tc.iterations, pairs_seen), "device": str(device)},
        "model": {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())},
    }
