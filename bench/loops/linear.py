"""Online preference alignment of an explicit log-linear policy (the ``linear`` task).

Per iteration: draw m training contexts, sample two actions per context from the current policy,
observe the training-mixture reward (plus noise), build the anchor log-probs (fixed reference or
the sampling iterate), the method's per-pair losses and robust objective, one optimizer step.
Evaluation is exact (``tasks.linear``): expected rewards under every mixture, KL to the reference
and the distance to the target parameter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

import methods
from bench.core.resources import loop_timings
from bench.loops.callbacks import OnEval
from bench.loops.config import loss_kwargs, method_radius
from bench.loops.evaluate import mixture_scores
from bench.loops.monitor import Monitor
from methods import GroupOptions, Method, PairScores
from methods.pointwise import preference_labels
from tasks.linear import LinearTask


def target_parameter(cfg: DictConfig, task: LinearTask) -> Tensor | None:
    """The population minimizer of the non-robust loss, where one exists.

    With a fixed reference anchor and rewards linear in the features, REBEL's regression is
    realizable at ``theta_ref + eta·w`` and DPO's Bradley-Terry likelihood at ``theta_ref + w/beta``
    (``w`` the training mixture of objectives). The prev-iterate anchor has no fixed point.
    """
    if cfg.method.anchor.value != "fixed_ref":
        return None
    w = task.train_weights() @ task.objectives
    loss = methods.get(cfg.method.name).loss
    if loss == "rebel":
        return task.theta_ref + cfg.method.eta * w
    if loss == "dpo" and cfg.method.labels.value in ("bernoulli", "soft"):
        return task.theta_ref + w / cfg.method.beta
    return None


@dataclass
class PairBatch:
    """One iteration's pairs: contexts, the two sampled actions' features, rewards, anchors, labels."""

    phi: Tensor  # [m, A, d] all actions of each context
    pair_phi: Tensor  # [m, 2, d] the two sampled actions
    rewards: Tensor  # [m, 2] observed training-mixture rewards
    anchor: Tensor  # [m, 2] anchor log-probs
    pref: Tensor  # [m] P(first preferred)

    def losses(
        self, method: Method, hparams: dict, theta: Tensor, sel: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Per-pair losses of rows ``sel`` and the features the Wasserstein penalty perturbs."""
        x = self.pair_phi[sel].clone().requires_grad_(True)
        log_norm = torch.logsumexp(self.phi[sel] @ theta, dim=-1, keepdim=True)
        scores = PairScores(x @ theta - log_norm, self.anchor[sel], self.rewards[sel], self.pref[sel])
        return methods.pointwise_losses(method, scores, **hparams), [x]


@torch.no_grad()
def sample_pairs(
    task: LinearTask, cfg: DictConfig, theta: Tensor, phi: Tensor, mix: Tensor, gen: torch.Generator
) -> PairBatch:
    """Two actions per context from the current policy, their noisy mixture rewards and labels."""
    actions = torch.multinomial(task.log_policy(theta, phi).exp(), 2, replacement=True, generator=gen)
    pair_phi = phi[torch.arange(len(phi))[:, None], actions]
    rewards = task.heads(pair_phi) @ mix
    rewards = rewards + cfg.task.noise * torch.randn(rewards.shape, generator=gen, dtype=rewards.dtype)
    anchor_theta = task.theta_ref if cfg.method.anchor.value == "fixed_ref" else theta
    anchor = task.log_policy(anchor_theta, phi).gather(1, actions)
    pref = preference_labels(rewards, cfg.method.labels.value, gen)
    return PairBatch(phi, pair_phi, rewards, anchor, pref)


def evaluate(task: LinearTask, theta: Tensor, target: Tensor | None, seed: int) -> dict:
    theta = theta.detach()
    scores = mixture_scores(
        task.expected_heads(theta, "test"), task.expected_heads(theta, "val"), task.protocol, seed=seed
    )
    scores["kl_ref"] = float(task.kl_to_reference(theta))
    scores["param_error"] = None if target is None else float((theta - target).norm())
    return scores


def train(
    cfg: DictConfig,
    task: LinearTask,
    run_dir: Path,
    on_eval: OnEval | None = None,
    monitor: Monitor | None = None,
) -> dict:
    """Train one cell (seconds: no checkpoints); returns metrics (final and reference rows), curves,
    per-step diagnostics and timings, and writes the live metrics to ``monitor``."""
    monitor = monitor or Monitor(run_dir)
    method = methods.get(cfg.method.name)
    radius = method_radius(cfg)
    hparams = loss_kwargs(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    theta = task.theta_ref.clone().requires_grad_(True)
    optimizer = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.train.optimizer.value]
    opt = optimizer([theta], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    target = target_parameter(cfg, task)
    mix = task.train_weights()
    phi_all, groups_all = task.train.phi, task.train.groups
    shares = torch.bincount(groups_all, minlength=cfg.task.groups).double()  # the training set's counts
    group_opts = GroupOptions(cfg.task.groups, cfg.method.group_update, shares)
    reference = evaluate(task, theta, target, cfg.seed)
    curves = [{"iteration": 0, **_curve_row(reference)}]
    steps = []
    state: dict = {}
    monitor.start(cfg.train.iterations)
    monitor.evaluation(0, reference)
    start = time.perf_counter()
    for it in range(1, cfg.train.iterations + 1):
        idx = torch.randint(phi_all.shape[0], (cfg.train.batch_size,), generator=gen)
        batch = sample_pairs(task, cfg, theta, phi_all[idx], mix, gen)
        opt.zero_grad(set_to_none=True)
        stats = methods.backward_robust(
            method,
            radius,
            len(idx),
            partial(batch.losses, method, hparams, theta),
            micro_batch=cfg.train.micro_batch,
            groups=groups_all[idx],
            state=state,
            w_form=cfg.method.w_form.value,
            group_options=group_opts,
        )
        state = stats.state or state
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([theta], cfg.train.grad_clip)
        opt.step()
        step = {"robust_value": float(stats.value), **methods.weight_diagnostics(method, stats)}
        steps.append({"iteration": it, **step})
        monitor.iteration(it, step)
        if it % cfg.train.eval_every == 0 or it == cfg.train.iterations:
            row = evaluate(task, theta, target, cfg.seed)
            curves.append({"iteration": it, **step, **_curve_row(row)})
            monitor.evaluation(it, row)
            if on_eval is not None:
                on_eval(it, row)
    elapsed = time.perf_counter() - start
    final = evaluate(task, theta, target, cfg.seed)
    monitor.finish(final)
    pairs = cfg.train.iterations * cfg.train.batch_size
    return {
        "metrics": final,
        "reference": reference,
        "curves": curves,
        "steps": steps,
        "timings": loop_timings(elapsed, cfg.train.iterations, pairs),
        "theta": theta.detach().tolist(),
    }


def _curve_row(scores: dict) -> dict:
    keys = ("worst_case", "worst_case_selected", "mean_over_test", "train_reward", "val_worst_case", "kl_ref")
    keys = (*keys, "param_error")
    return {k: scores[k] for k in keys}
