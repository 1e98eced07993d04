"""Gradients of the robust objectives: envelope theorem, batching invariance, the W penalty."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _problem import HPARAMS, accumulated_grads, full_batch_grads, losses_fn, make, radius
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
from methods.robust import chi2_weights, kl_constrained, kl_weights, tv_weights
from methods.wasserstein import double_backprop_attention, grad_sq_norms

ALL = methods.names()


def robust_value(method, model, data):
    """The robust objective as a plain function of the parameters (through the solvers)."""
    losses, inputs = losses_fn(method, model, data)(torch.arange(len(data["pref"])))
    if method.aggregator.kind == "wasserstein":
        g = grad_sq_norms(losses, inputs, create_graph=True)
        return losses.mean() + radius(method) * torch.sqrt(g.mean() + 1e-12)
    return method.aggregator.weights(losses, radius(method))[1]


ENVELOPE = [n for n in ALL if methods.get(n).aggregator.kind in ("weights", "wasserstein")]


@pytest.mark.parametrize("name", [n for n in ENVELOPE if methods.get(n).aggregator.name != "erm"])
def test_gradient_is_envelope_gradient(name):
    """d(robust value)/d theta by central finite differences == grad of sum_i p_i l_i."""
    method = methods.get(name)
    model, data = make(1)
    grads, _ = full_batch_grads(method, model, data)
    params = list(model.parameters())
    h = 1e-6
    for param, grad in zip(params, grads, strict=True):
        flat = param.data.view(-1)
        for j in range(0, flat.numel(), max(1, flat.numel() // 4)):
            old = float(flat[j])
            flat[j] = old + h
            up = float(robust_value(method, model, data).detach())
            flat[j] = old - h
            down = float(robust_value(method, model, data).detach())
            flat[j] = old
            assert (up - down) / (2 * h) == pytest.approx(float(grad.view(-1)[j]), rel=1e-5, abs=1e-6)


def test_group_gradient_holds_alpha_fixed():
    """GR-DPO is a mirror-ascent step: grad = sum_g alpha_g grad L_g with the updated alpha fixed."""
    method = methods.get("gr-dpo")
    model, data = make(4)
    grads, stats = full_batch_grads(method, model, data)
    model.zero_grad()
    losses, _ = losses_fn(method, model, data)(torch.arange(64))
    alpha = stats.state["alpha"]
    group_means = torch.stack([losses[data["groups"] == g].mean() for g in range(3)])
    (alpha * group_means).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_kl_gradient_equals_autograd_of_closed_form():
    method = methods.get("kl-rebel")
    model, data = make(2)
    grads, _ = full_batch_grads(method, model, data)
    model.zero_grad()
    losses, _ = losses_fn(method, model, data)(torch.arange(64))
    tau = radius(method)
    (tau * (torch.logsumexp(losses / tau, 0) - torch.log(torch.tensor(64.0)))).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("micro", [16, 5])
def test_accumulation_gives_the_full_batch_gradient(name, micro):
    method = methods.get(name)
    model, data = make(3)
    full, stats_full = full_batch_grads(method, model, data)
    acc, stats_acc = accumulated_grads(method, model, data, micro)
    for a, b in zip(full, acc, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats_full.value, stats_acc.value)


def test_two_ranks_give_the_full_batch_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    worker = Path(__file__).with_name("_dist_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(worker),
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_out = torch.load(out)
    assert set(dist_out) == set(ALL)
    for name in ALL:
        model, data = make()
        grads, stats = full_batch_grads(methods.get(name), model, data)
        for a, b in zip(grads, dist_out[name]["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.value, dist_out[name]["value"])


def test_wasserstein_penalty_matches_a_per_sample_loop_on_a_tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    model.eval()
    ids = torch.randint(0, 50, (6, 9))  # [chosen (3); rejected (3)]
    embed = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def losses_of(emb):
        with double_backprop_attention():
            logits = model(inputs_embeds=emb).logits[:, :-1]
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
        pair = torch.stack([logps[:3], logps[3:]], 1)
        scores = methods.PairScores(pair, torch.zeros(3, 2), torch.tensor([[1.0, 0.0]] * 3), torch.ones(3))
        return methods.pointwise_losses(methods.get("w-rebel"), scores, eta=1.0)

    losses = losses_of(embed)
    batched = grad_sq_norms(losses, [embed])
    loop = []
    for i in range(3):
        (g,) = torch.autograd.grad(losses[i], embed, retain_graph=True)
        loop.append(float(g[i].pow(2).sum() + g[i + 3].pow(2).sum()))
        others = [j for j in range(6) if j not in (i, i + 3)]
        assert float(g[others].abs().max()) == 0.0  # samples do not interact
    torch.testing.assert_close(batched, torch.tensor(loop), rtol=1e-5, atol=1e-8)

    # The double-backprop gradient of the objective matches the loop-built objective's gradient.
    params = [p for p in model.parameters() if p.requires_grad]
    obj = methods.robust_objective(methods.get("w-rebel"), 0.3, losses, inputs=[embed])
    fast = torch.autograd.grad(obj.loss, params, retain_graph=True, allow_unused=True)
    per = [torch.autograd.grad(losses[i], embed, create_graph=True)[0] for i in range(3)]
    g_loop = torch.stack([per[i][i].pow(2).sum() + per[i][i + 3].pow(2).sum() for i in range(3)])
    slow = torch.autograd.grad(
        losses.mean() + 0.3 * torch.sqrt(g_loop.mean() + 1e-12), params, allow_unused=True
    )
    for a, b in zip(fast, slow, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


losses_strategy = st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=40).map(
    lambda xs: torch.tensor(xs, dtype=torch.float64)
)
SOLVERS = [(chi2_weights, (0.0, 5.0)), (kl_constrained, (0.0, 3.0)), (tv_weights, (0.0, 1.0))]


@settings(max_examples=60, deadline=None)
@given(losses_strategy, st.floats(0, 1), st.floats(0, 1), st.sampled_from(range(len(SOLVERS))))
def test_properties_distribution_above_mean_monotone(losses, a, b, which):
    fn, (lo, hi) = SOLVERS[which]
    r1, r2 = sorted([lo + a * (hi - lo), lo + b * (hi - lo)])
    p1, v1 = fn(losses, r1)
    _, v2 = fn(losses, r2)
    scale = 1e-9 * (1 + float(losses.abs().max()))
    assert float(p1.min()) >= 0 and float(p1.sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(v1) >= float(losses.mean()) - scale
    assert float(v1) <= float(losses.max()) + scale
    assert float(v2) >= float(v1) - scale


@settings(max_examples=60, deadline=None)
@given(losses_strategy, st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_properties_kl_penalized_decreasing_in_tau(losses, t1, t2):
    t1, t2 = sorted([t1, t2])
    p, v1 = kl_weights(losses, t1)
    _, v2 = kl_weights(losses, t2)
    scale = 1e-9 * (1 + float(losses.abs().max()))
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(losses.mean()) - scale <= float(v2) <= float(v1) + scale <= float(losses.max()) + 2 * scale


def test_hparams_cover_every_loss():
    assert {m.loss for m in map(methods.get, ALL)} <= set(HPARAMS)
