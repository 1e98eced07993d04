"""One training step of the LM loop on a fixed pair batch (shared by the 1- and 2-rank tests)."""

from functools import partial

import torch

import methods
from bench.core.lm import sequence_batch
from bench.loops.train import PairBatch

METHODS = [n for n in methods.names() if methods.get(n).loss != "bt"]  # what the LM loop runs


def global_batch(tok) -> PairBatch:
    """8 pairs of different lengths (padding on purpose), rewards, labels, 3 groups, anchors."""
    gen = torch.Generator().manual_seed(0)
    prompts = [[5 + i, 6, 7 + i % 3][: 1 + i % 3] for i in range(8)] * 2
    responses = [[20 + (7 * i + j) % 30 for j in range(1 + (3 * i) % 4)] for i in range(16)]
    return PairBatch(
        sequence_batch(prompts, responses, tok.pad_token_id),
        torch.randn(8, 2, generator=gen),
        torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]),
        torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
        torch.randn(8, 2, generator=gen) - 15,
    )


def one_step(policy, batch: PairBatch, name: str, micro_batch: int = 0) -> tuple[dict, float]:
    method = methods.get(name)
    hparams = {"eta": 0.5} if method.loss == "rebel" else {"beta": 0.1}
    radius = method.knob.default if method.knob else 0.0
    policy.train()
    policy.zero_grad(set_to_none=True)
    stats = methods.backward_robust(
        method,
        radius,
        batch.m,
        partial(batch.losses, policy, method, hparams, 0.7),
        micro_batch=micro_batch,
        groups=batch.groups,
        state={},
    )
    return {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}, float(stats.value)
