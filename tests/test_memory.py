"""Memory that fits: gradient checkpointing gives the same gradients, bounded log-prob chunks give
the same log-probs, and fp32 master weights are what keeps small AdamW updates."""

from functools import partial

import pytest
import torch

import methods
from bench.core import lm
from bench.core.lm import chunked_logps, sequence_batch, sequence_logps
from bench.loops.train import PairBatch, disable_dropout, enable_checkpointing
from methods.wasserstein import double_backprop_attention
from tasks.lexicon.presets import load_policy


def pair_batch(tok):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]] * 2
    responses = [[20, 21], [22, 23, 24], [25], [26, 27, 28, 29], [30], [31, 32], [33, 34, 35], [36]]
    seqs = sequence_batch(prompts, responses, tok.pad_token_id)  # padding on purpose
    gen = torch.Generator().manual_seed(0)
    return PairBatch(
        seqs,
        torch.randn(4, 2, generator=gen),
        torch.tensor([1.0, 0.0, 1.0, 1.0]),
        torch.zeros(4, dtype=torch.long),
        torch.randn(4, 2, generator=gen) - 20,
    )


def gradients(policy, batch, name: str) -> tuple[dict, int]:
    """The gradient of one step and the bytes autograd saved for the backward."""
    method = methods.get(name)
    hparams = {"eta": 0.5} if method.loss == "rebel" else {"beta": 0.1}
    policy.zero_grad(set_to_none=True)
    policy.train()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    radius = method.knob.default if method.knob else 0.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        methods.backward_robust(method, radius, batch.m, partial(batch.losses, policy, method, hparams, 0.7))
    return {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}, saved[0]


@pytest.mark.parametrize("name", ["rebel", "w-rebel", "chi2-dpo"])
def test_gradient_checkpointing_gives_the_same_gradient(name):
    # The Wasserstein methods differentiate through the gradient (double backward): checkpointing
    # must recompute the layers inside that graph too.
    policy, tok = load_policy("tiny", steps=60)
    disable_dropout(policy)
    batch = pair_batch(tok)
    plain, plain_bytes = gradients(policy, batch, name)
    enable_checkpointing(policy, double_backprop_attention if name.startswith("w-") else None)
    checkpointed, checkpointed_bytes = gradients(policy, batch, name)
    # Fewer saved activations (for W the recompute inside the first backward saves the graph that
    # the second needs, so less is freed; the tiny model's logits are not checkpointed either).
    assert checkpointed_bytes < (0.9 if name.startswith("w-") else 0.6) * plain_bytes
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for key in plain:
        # float32 reordering only: errors far below the gradient's scale (a wrong recompute is O(1))
        scale = float(plain[key].abs().max())
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6 * scale + 1e-9)


def test_bounded_chunks_give_the_same_log_probs(monkeypatch):
    policy, tok = load_policy("tiny", steps=60)
    seqs = pair_batch(tok).seqs
    whole = sequence_logps(policy.eval(), seqs, 0.7)
    width, vocab = seqs.input_ids.shape[1], policy.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(lm, "LOGIT_BUDGET_BYTES", 12 * vocab * width * 3)  # three rows per forward
    calls = []
    body = lm.split_head(policy)[0]  # the forward that runs once per chunk (the head runs after it)
    forward = body.forward
    monkeypatch.setattr(
        body, "forward", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k)
    )
    chunked = chunked_logps(policy, seqs, 0.7)
    assert calls == [3, 3, 2]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_bf16_weights_lose_small_adamw_updates_that_fp32_master_weights_keep():
    # Why the policy keeps fp32 master weights under bf16 autocast: AdamW moves each weight by
    # about lr per step; at lr 1e-5 and |w| ~ 0.02 that is 5e-4 relative, below bf16's 2^-8.
    gen = torch.Generator().manual_seed(0)
    w0 = 0.02 * torch.randn(10_000, generator=gen)
    grad = torch.randn(10_000, generator=gen)
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(w0.to(dtype).clone())
        opt = torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0)
        w.grad = grad.to(dtype)
        opt.step()
        moved[dtype] = float((w.detach().float() != w0.to(dtype).float()).float().mean())
    assert moved[torch.float32] > 0.99
    assert moved[torch.bfloat16] < 0.2


@pytest.mark.slow
def test_a_wasserstein_cell_trains_with_checkpointing(tmp_path):
    # The loop's wiring: without the math-attention recompute this cell fails with a CheckpointError.
    import json

    from conftest import LEXICON_FAST

    from bench.harness.runner import Cell, record_path, run_cell

    cell = Cell(
        "lexicon", "w-rebel", 0, (*LEXICON_FAST, "train.iterations=2", "train.grad_checkpointing=true")
    )
    assert run_cell(cell, tmp_path) == "completed"
    assert json.loads(record_path(cell, tmp_path).read_text())["config"]["train"]["grad_checkpointing"]
