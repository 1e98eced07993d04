"""The Wasserstein penalty on the training code path, against a per-sample loop built by hand.

A tiny GPT-2 policy, pairs of different lengths right-padded by ``sequence_batch``, and the loss
closure of the language-model loop (``PairBatch.losses``), whose input embeddings come from
``policy.get_input_embeddings()`` and are **not** detached: the penalty's double backward reaches
the embedding matrix through them as well as through the tied head. For both forms,

* ``sqrt_mean``:     ``mean_i l_i + rho0·sqrt(mean_i g_i + 1e-12)``,
* ``per_sample_sq``: ``mean_i (l_i + rho0·g_i)`` (the official WDPO code),

with ``g_i = ||d l_i / d e(first_i)||^2 + ||d l_i / d e(second_i)||^2``, each pair's input gradient
computed alone by ``torch.autograd.grad(l_i, embeds, create_graph=True)``. The value and every
parameter gradient of ``methods.backward_robust`` (one pass and micro-batches) must match.
"""

from functools import partial

import pytest
import torch

import methods
from bench.core.lm import sequence_batch
from bench.loops.train import PairBatch

RHO0 = 0.3
PROMPTS = ["The cat", "A long story about the old", "Tomorrow"]
FIRST = [" sat on the mat and", " house", " we will see the sea again"]
SECOND = [" ran", " garden was green and quiet today", " rain"]
CASES = [("w-rebel", {"eta": 0.5, "form": "inv_eta"}), ("wdpo", {"beta": 0.7})]


@pytest.fixture(scope="module")
def policy_and_batch():
    from tasks.lexicon.presets import load_policy

    policy, tok = load_policy("tiny", steps=60)
    policy.eval()  # no dropout: every forward is the same function
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    responses = [tok(r).input_ids for r in FIRST + SECOND]
    seqs = sequence_batch(prompt_ids * 2, responses, tok.pad_token_id)
    lengths = seqs.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 6 and int(lengths.min()) < seqs.input_ids.shape[1]  # padded
    gen = torch.Generator().manual_seed(0)
    m = len(PROMPTS)
    batch = PairBatch(
        seqs,
        rewards=torch.rand(m, 2, generator=gen),
        pref=torch.tensor([1.0, 0.0, 0.7]),
        groups=torch.zeros(m, dtype=torch.long),
        anchor=-20 * torch.rand(m, 2, generator=gen),
    )
    return policy, batch


def fast_path(policy, batch, method, hparams, form, micro):
    policy.zero_grad(set_to_none=True)
    losses_fn = partial(batch.losses, policy, method, hparams, 1.0)
    stats = methods.backward_robust(method, RHO0, batch.m, losses_fn, micro_batch=micro, w_form=form)
    return float(stats.value), [p.grad.clone() for p in policy.parameters()]


def per_sample_loop(policy, batch, method, hparams, form):
    """Each pair's input-gradient norm on its own, the objective assembled by hand."""
    policy.zero_grad(set_to_none=True)
    m = batch.m
    losses, (embeds,) = batch.losses(policy, method, hparams, 1.0, torch.arange(m))
    assert embeds.requires_grad and embeds.grad_fn is not None  # from the embedding layer, not detached
    norms = []
    for i in range(m):
        (g,) = torch.autograd.grad(losses[i], embeds, create_graph=True)
        seen = g.detach()
        others = [j for j in range(2 * m) if j not in (i, i + m)]
        assert float(seen[others].abs().max()) == 0.0  # pair i's loss sees only its own two rows
        pad = batch.seqs.attention_mask[[i, i + m]] == 0
        assert float(seen[[i, i + m]][pad].abs().sum()) == 0.0  # padding is inert
        norms.append(g[i].pow(2).sum() + g[i + m].pow(2).sum())
    g = torch.stack(norms)
    if form == "sqrt_mean":
        objective = losses.mean() + RHO0 * torch.sqrt(g.mean() + 1e-12)
    else:
        objective = (losses + RHO0 * g).mean()
    objective.backward()
    return float(objective.detach()), [p.grad.clone() for p in policy.parameters()], g.detach()


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["sqrt_mean", "per_sample_sq"])
def test_penalty_value_and_gradient_match_a_per_sample_loop(policy_and_batch, name, hparams, form):
    policy, batch = policy_and_batch
    method = methods.get(name)
    value, slow, g = per_sample_loop(policy, batch, method, hparams, form)
    assert float(g.min()) > 0  # the penalty is not trivially zero
    penalty = RHO0 * (float(g.mean()) if form == "per_sample_sq" else float(g.mean()) ** 0.5)
    assert penalty > 1e-3 * value  # ... and large enough that a wrong scale shows
    for micro in (0, 2):  # one pass; two passes over micro-batches of 2 and 1 pairs
        fast_value, fast = fast_path(policy, batch, method, hparams, form, micro)
        assert fast_value == pytest.approx(value, rel=1e-5)
        for (pname, _), a, b in zip(policy.named_parameters(), fast, slow, strict=True):
            scale = float(b.abs().max()) + 1e-12
            assert float((a - b).abs().max()) <= 2e-4 * scale, (micro, pname)


def test_the_embedding_matrix_gets_the_penalty_gradient(policy_and_batch):
    """Non-detached embeddings: the penalty's gradient on wte differs from the loss-only one."""
    policy, batch = policy_and_batch
    method = methods.get("w-rebel")
    hparams = {"eta": 0.5, "form": "inv_eta"}
    policy.zero_grad(set_to_none=True)
    losses, _ = batch.losses(policy, methods.get("rebel"), hparams, 1.0, torch.arange(batch.m))
    losses.mean().backward()
    plain = policy.get_input_embeddings().weight.grad.clone()
    _, robust = fast_path(policy, batch, method, hparams, "per_sample_sq", 0)
    wte = [n for n, _ in policy.named_parameters()].index("transformer.wte.weight")
    assert float((robust[wte] - plain).abs().max()) > 1e-3 * float(plain.abs().max())
