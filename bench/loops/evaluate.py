"""Scores of a policy on held-out preference mixtures, from per-prompt objective rewards.

Responses are scored once into ``R[N, K]`` (one row per held-out prompt, one column per objective:
the mean over ``eval.samples`` responses); every mixture is then a weight vector over the columns,
so adding mixtures costs nothing. Per mixture: the mean over prompts with a percentile bootstrap CI
over prompts; then the worst case (min over test mixtures, with its own bootstrap CI), the worst
case selected on validation prompts and scored on test prompts, the mean over test mixtures and the
reward of the training mixture. Validation mixtures are scored on validation prompts for tuning.
``R`` itself goes into the record (``per_prompt``), so methods of a seed, which are evaluated on
the same prompts with the same sampling streams, can be compared prompt by prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.core.lm import chunked_logps, sample, sequence_batch
from bench.loops.distributed import gather_rows, is_sharded, padded_shard, world
from tasks.mixtures import Mixture, Protocol


def _mixture_matrix(heads: Tensor, mixtures: tuple[Mixture, ...]) -> Tensor:
    return torch.stack([m.apply(heads) for m in mixtures], dim=1)  # [N, M]


def _resample_weights(n: int, reps: int, gen: torch.Generator) -> Tensor:
    """Bootstrap resamples of n prompts as weights ``[reps, n]`` (counts / n): a replicate's mean
    of any per-prompt quantity is one matrix product, with no ``[reps, n, M]`` tensor."""
    idx = torch.randint(n, (reps, n), generator=gen)
    return (
        torch.zeros(reps, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(reps, n, dtype=torch.float64)
        )
        / n
    )


def _mixture_replicates(heads: Tensor, mixtures: tuple[Mixture, ...], weights: Tensor) -> Tensor:
    """Bootstrap replicates of every mixture's mean ``[reps, M]``. Convex mixtures are linear in the
    heads, so the K head means are resampled once and mapped through the weights: the cost does
    not grow with prompts x mixtures."""
    if all(m.kind == "convex" for m in mixtures):
        w = torch.tensor([m.weights for m in mixtures], dtype=torch.float64)
        return (weights @ heads) @ w.T
    return weights @ _mixture_matrix(heads, mixtures)


def mixture_scores(
    test_heads: Tensor, val_heads: Tensor, protocol: Protocol, *, bootstrap: int = 1000, seed: int = 0
) -> dict:
    """All mixture metrics of one evaluation (floats, JSON-ready)."""
    gen = torch.Generator().manual_seed(seed)
    test_heads = test_heads.double()
    means = _mixture_replicates(
        test_heads, protocol.test, torch.full((1, len(test_heads)), 1 / len(test_heads), dtype=torch.float64)
    )[0]
    out: dict = {"mixtures": {}}
    reps = None
    if bootstrap:
        reps = _mixture_replicates(
            test_heads, protocol.test, _resample_weights(len(test_heads), bootstrap, gen)
        )
    bounds = None
    if reps is not None:
        bounds = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=reps.dtype), dim=0).T.tolist()
    for j, m in enumerate(protocol.test):
        row = {"reward": float(means[j]), "weights": list(m.weights), "kind": m.kind}
        alpha = protocol.pair_alpha(m)
        if alpha is not None:
            row["pair_alpha"] = alpha
        if bounds is not None:
            row.update(ci_low=bounds[j][0], ci_high=bounds[j][1])
        out["mixtures"][m.name] = row
    worst = int(means.argmin())
    out["worst_case"] = float(means[worst])
    out["worst_mixture"] = protocol.test[worst].name
    if reps is not None:
        lo, hi = torch.quantile(reps.min(1).values, torch.tensor([0.025, 0.975], dtype=reps.dtype))
        out["worst_case_ci"] = [float(lo), float(hi)]
    # The worst case without the winner's curse: the test mixture that is worst on the validation
    # prompts, scored on the test prompts (the min over noisy test means is biased low).
    selected = int(_mixture_matrix(val_heads.double(), protocol.test).mean(0).argmin())
    out["worst_case_selected"] = float(means[selected])
    out["selected_mixture"] = protocol.test[selected].name
    if reps is not None:
        lo, hi = torch.quantile(reps[:, selected], torch.tensor([0.025, 0.975], dtype=reps.dtype))
        out["worst_case_selected_ci"] = [float(lo), float(hi)]
    out["mean_over_test"] = float(means.mean())
    out["objectives"] = list(protocol.names)
    out["seen_pair"] = [protocol.names[k] for k in protocol.seen[:2]] if protocol.names else []
    out["train_reward"] = float(protocol.train.apply(test_heads).mean())
    val = _mixture_matrix(val_heads.double(), protocol.val).mean(0)
    out["val_worst_case"] = float(val.min())
    out["val_mean"] = float(val.mean())
    out["per_prompt"] = {"test": _rounded(test_heads), "val": _rounded(val_heads)}
    return out


def _rounded(heads: Tensor) -> list[list[float]]:
    """Per-prompt head rewards ``[N, K]`` for the record (8 significant digits keep it small)."""
    return [[float(f"{v:.8g}") for v in row] for row in heads.double().tolist()]


STD_FLOOR = 1e-2  # heads whose reference std is below this are scaled by 1/STD_FLOOR


@dataclass
class HeadScaler:
    """Standardization of reward heads with statistics frozen from the reference policy.

    ``z = (h - mean) / max(std, STD_FLOOR)``; with no statistics it is the identity (geometric
    mixtures need the raw, non-negative heads).
    """

    mean: list[float] | None = None
    std: list[float] | None = None

    def __call__(self, heads: Tensor) -> Tensor:
        if self.mean is None:
            return heads
        return (heads - heads.new_tensor(self.mean)) / heads.new_tensor(self.std)

    def state(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_reference(cls, reference, tok, task, seed: int, n_prompts: int = 64) -> HeadScaler:
        """Statistics of two reference samples on each of the first ``n_prompts`` training prompts."""
        prompts = [p.text for p in task.prompts("train")[:n_prompts]]
        with seeded_rng(seed + 17, reference):
            samples = sample(reference, tok, prompts, 2, task.sampling)
        heads = task.score([p for p in prompts for _ in (0, 1)], samples.texts)
        return cls(heads.mean(0).tolist(), heads.std(0).clamp_min(STD_FLOOR).tolist())


@contextmanager
def seeded_rng(seed: int, model) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's RNG streams after it."""
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _per_prompt_heads(task, scaler: HeadScaler, prompts: list[str], texts: list[str], k: int) -> list:
    """Each prompt's heads averaged over its ``k`` responses (``[n, K]`` as lists)."""
    heads = scaler(task.score([p for p in prompts for _ in range(k)], texts))
    return heads.view(len(prompts), k, -1).mean(1).tolist()


@torch.no_grad()
def evaluate_lm(
    policy,
    *,
    task,
    tok,
    reference,
    scaler: HeadScaler,
    seed: int,
    iteration: int,
    samples: int = 1,
    show: int = 4,
):
    """Score a policy on the held-out prompts: mixture metrics, KL to the reference, length.

    ``samples`` responses per test and validation prompt, sampled with a seed fixed by (seed,
    iteration) in a forked RNG: training randomness is untouched, and every method of a seed draws
    from the same streams on the same prompts (common random numbers). Heads are scored once and
    averaged per prompt; every mixture is then a weight vector. KL(policy || reference) per token
    is the Monte Carlo estimate ``mean_y [sum_t log pi(y_t) - log pi_ref(y_t)] / |y|`` on the test
    responses.
    """
    rank, size = world()  # under train.nproc each rank samples and scores its block of prompts;
    test_prompts = [p.text for p in task.prompts("test")]  # a sharded policy's blocks are padded
    val_prompts = [p.text for p in task.prompts("val")]  # to one length (its forwards are collective)
    pad = is_sharded(policy)
    (padded_test, n_test), (padded_val, n_val) = (
        padded_shard(p, rank, size, pad) for p in (test_prompts, val_prompts)
    )
    with seeded_rng(seed * 1_000_003 + iteration + rank * 104_729, policy):
        test = sample(policy, tok, padded_test, samples, task.sampling)
        val = sample(policy, tok, padded_val, samples, task.sampling).first(n_val, samples)
    prompt_ids = [ids for ids in test.prompt_ids for _ in range(samples)]
    seqs = sequence_batch(prompt_ids, test.response_ids, tok.pad_token_id).to(
        next(policy.parameters()).device
    )
    temperature = task.sampling.temperature
    diff = chunked_logps(policy, seqs, temperature) - chunked_logps(reference, seqs, temperature)
    test, mine_test, mine_val = test.first(n_test, samples), padded_test[:n_test], padded_val[:n_val]
    diff, lengths = diff[: n_test * samples], seqs.target_mask.sum(1)[: n_test * samples]
    per_token = (diff.float() / lengths.clamp_min(1)).view(len(mine_test), samples)
    rows = gather_rows(
        list(
            zip(
                _per_prompt_heads(task, scaler, mine_test, test.texts, samples),
                per_token.mean(1).tolist(),
                lengths.double().view(len(mine_test), samples).mean(1).tolist(),
                test.texts[::samples],
                strict=True,
            )
        )
    )
    heads_test = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    heads_val = torch.tensor(
        gather_rows(_per_prompt_heads(task, scaler, mine_val, val.texts, samples)), dtype=torch.float64
    )
    texts = [r[3] for r in rows]
    scores = mixture_scores(heads_test, heads_val, task.protocol, seed=seed)
    scores["kl_ref"] = float(torch.tensor([r[1] for r in rows]).mean())
    scores["response_len"] = float(torch.tensor([r[2] for r in rows], dtype=torch.float64).mean())
    scores["eval_samples"] = samples
    train_mix = task.protocol.train.apply(heads_test)
    shown = [
        {"prompt": test_prompts[i], "response": texts[i], "train_reward": float(train_mix[i])}
        for i in range(min(show, len(test_prompts)))
    ]
    return scores, shown
