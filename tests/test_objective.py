"""Gradients of the robust objectives: envelope theorem, batching invariance, the W penalty."""

import math
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


def hand_built_wasserstein(model, data, form, rho):
    """Per-sample input gradients one by one, the objective of ``form`` assembled by hand."""
    method = methods.get("w-rebel")
    model.zero_grad()
    losses, (x,) = losses_fn(method, model, data)(torch.arange(len(data["pref"])))
    g = torch.stack(
        [torch.autograd.grad(losses[i], x, create_graph=True)[0][i].pow(2).sum() for i in range(len(losses))]
    )
    if form == "sqrt_mean":
        objective = losses.mean() + rho * torch.sqrt(g.mean() + 1e-12)
    else:
        objective = (losses + rho * g).mean()
    objective.backward()
    return objective.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("form", ["sqrt_mean", "per_sample_sq"])
@pytest.mark.parametrize("micro", [0, 16, 5])
def test_wasserstein_forms_match_a_hand_built_objective(form, micro):
    """Both forms' value and gradient (one pass and accumulated) against a per-sample loop."""
    method, rho = methods.get("w-rebel"), 0.3
    model, data = make(7)
    value, slow = hand_built_wasserstein(model, data, form, rho)
    model.zero_grad()
    stats = methods.backward_robust(
        method, rho, 64, losses_fn(method, model, data), micro_batch=micro, w_form=form
    )
    torch.testing.assert_close(stats.value, value, rtol=1e-12, atol=1e-12)
    for p, b in zip(model.parameters(), slow, strict=True):
        torch.testing.assert_close(p.grad, b, rtol=1e-10, atol=1e-12)
    assert float(stats.weights.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float(stats.weights.min()) == pytest.approx(1 / 64, abs=1e-16)


def test_wasserstein_forms_by_hand():
    """Losses [1, 3], norms [4, 16], rho 0.5: sqrt_mean 2 + 0.5·sqrt(10); per_sample_sq 2 + 0.5·10."""
    method = methods.get("wdpo")
    losses, g = torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([4.0, 16.0], dtype=torch.float64)
    root = methods.global_weights(method, 0.5, losses, grad_sq=g)
    assert float(root.value) == pytest.approx(2 + 0.5 * 10**0.5, abs=1e-6)  # 3.5811388
    assert float(root.grad_scale) == pytest.approx(0.5 / (2 * (10 + 1e-12) ** 0.5), rel=1e-12)
    square = methods.global_weights(method, 0.5, losses, grad_sq=g, w_form="per_sample_sq")
    assert float(square.value) == pytest.approx(7.0, abs=1e-12)
    assert float(square.grad_scale) == 0.5
    # The local share of a slice: sum p_i l_i + c·sum g_i / N.
    share = methods.local_objective(square, losses[1:], 1, g[1:])
    assert float(share) == pytest.approx(0.5 * 3 + 0.5 * 16 / 2, abs=1e-12)
    zero = methods.global_weights(method, 0.5, losses, grad_sq=torch.zeros(2, dtype=torch.float64))
    assert float(zero.value) == pytest.approx(2 + 0.5e-6, abs=1e-12)  # sqrt(0 + 1e-12) = 1e-6
    assert float(zero.grad_scale) == pytest.approx(0.5 / 2e-6, rel=1e-12)  # finite


def test_objective_errors_are_clear():
    losses = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown Wasserstein form 'sq'"):
        methods.global_weights(methods.get("w-rebel"), 0.1, losses, grad_sq=losses, w_form="sq")
    with pytest.raises(ValueError, match="w-rebel needs the per-sample input-gradient norms"):
        methods.global_weights(methods.get("w-rebel"), 0.1, losses)
    with pytest.raises(ValueError, match="w-rebel needs the inputs"):
        methods.robust_objective(methods.get("w-rebel"), 0.1, losses)
    with pytest.raises(ValueError, match="gr-dpo needs a group id per sample"):
        methods.global_weights(methods.get("gr-dpo"), 0.1, losses)
    odd = methods.Method("odd", "dpo", methods.registry.Aggregator("odd", None, None, kind="mystery"), "")
    with pytest.raises(ValueError, match="aggregator 'odd' has unknown kind 'mystery'"):
        methods.global_weights(odd, 0.1, losses)


def test_local_objective_takes_its_slice_of_the_weights():
    stats = methods.GlobalWeights(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.tensor(0.0))
    part = methods.local_objective(stats, torch.tensor([10.0, 100.0], dtype=torch.float64), 2)
    assert float(part) == pytest.approx(0.3 * 10 + 0.4 * 100, abs=1e-12)


class FakeDist:
    """Two ranks in one process: ``all_gather`` hands back every rank's block (torch's contract:
    each output has the input's shape and dtype)."""

    def __init__(self, rank, blocks):
        self.rank, self.blocks, self.calls = rank, blocks, 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return len(self.blocks)

    def all_gather(self, out, tensor):
        assert len(out) == len(self.blocks)
        assert all(o.shape == tensor.shape and o.dtype == tensor.dtype for o in out)
        own = self.blocks[self.rank]
        if self.calls == 0:  # the lengths
            assert tensor.tolist() == [own.numel()]
            values = [torch.tensor([b.numel()]) for b in self.blocks]
        else:  # the blocks, zero-padded to the longest
            assert tensor.numel() == max(b.numel() for b in self.blocks)
            assert tensor[: own.numel()].tolist() == own.tolist() and not tensor[own.numel() :].any()
            values = [
                torch.cat([b, torch.zeros(tensor.numel() - b.numel(), dtype=b.dtype)]) for b in self.blocks
            ]
        for o, v in zip(out, values, strict=True):
            o.copy_(v)
        self.calls += 1


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_detached_joins_ranks_of_different_lengths(monkeypatch, rank):
    from methods import distributed

    blocks = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]
    monkeypatch.setattr(distributed, "dist", FakeDist(rank, blocks))
    assert distributed.world() == (rank, 2)
    local = blocks[rank].clone().requires_grad_(True)
    full, offset = distributed.gather_detached(local)
    assert full.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert offset == [0, 3][rank]
    assert not full.requires_grad


def test_world_outside_torch_distributed(monkeypatch):
    from methods import distributed

    class Off(FakeDist):
        def is_initialized(self):
            return False

    monkeypatch.setattr(distributed, "dist", Off(1, [torch.ones(1)] * 2))
    assert distributed.world() == (0, 1)
    local = torch.tensor([2.0, 3.0], requires_grad=True)
    full, offset = distributed.gather_detached(local)
    assert full.tolist() == [2.0, 3.0] and offset == 0 and not full.requires_grad


@pytest.fixture
def scratch_registry():
    """Names registered by a test, removed again afterwards."""
    added = []
    yield added
    for registry, name in added:
        registry._items.pop(name, None)


def test_register_aggregator_and_method(scratch_registry):
    from bench.core.registry import UnknownNameError
    from methods.registry import AGGREGATORS, METHODS, Knob

    def tilt(losses, radius):
        """Doc line of the weights."""
        return methods.AGGREGATORS.get("erm").weights(losses, radius)

    scratch_registry += [(AGGREGATORS, "t-agg"), (AGGREGATORS, "t-group"), (METHODS, "t-m")]
    knob = Knob("r", 0.5, 0.1, 1.0, larger_is_more_robust=True)
    assert methods.register_aggregator("t-agg", knob)(tilt) is tilt
    agg = AGGREGATORS.get("t-agg")
    assert (agg.name, agg.knob, agg.weights, agg.kind) == ("t-agg", knob, tilt, "weights")
    assert agg.description == "Doc line of the weights."
    methods.register_aggregator("t-group", None, kind="group", description="explicit")(tilt)
    group = AGGREGATORS.get("t-group")
    assert (group.kind, group.description, group.knob) == ("group", "explicit", None)
    method = methods.register_method("t-m", "ipo", "t-agg", "a test method", "nowhere")
    assert METHODS.get("t-m") is method is methods.get("t-m")
    assert (method.name, method.loss, method.aggregator, method.description, method.reference) == (
        "t-m",
        "ipo",
        agg,
        "a test method",
        "nowhere",
    )
    assert method.knob is knob and method.base == "ipo"
    with pytest.raises(UnknownNameError, match="unknown loss 'hinge'"):
        methods.register_method("t-bad", "hinge", "t-agg", "")
    with pytest.raises(UnknownNameError, match="unknown aggregator 'nope'"):
        methods.register_method("t-bad", "dpo", "nope", "")
    assert "t-bad" not in METHODS
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("t-m", "dpo", "t-agg", "")


def test_knob_validate():
    from methods.registry import Knob

    knob = Knob("rho", 0.01, 1e-3, 2.0, larger_is_more_robust=True)
    assert knob.validate(None) == 0.01
    assert knob.validate(1) == 1.0 and isinstance(knob.validate(1), float)
    assert knob.validate(1e-3) == 1e-3 and knob.validate(2.0) == 2.0  # the range is closed
    assert knob.validate(0) == 0.0  # zero switches the robustness off, whatever the range
    for bad in (-0.5, math.nan):
        with pytest.raises(ValueError, match=r"^rho = .*: a radius must be a non-negative number"):
            knob.validate(bad)
    with pytest.raises(ValueError, match=r"^method\.rho = 2\.5 is outside the valid range \[0\.001, 2\.0\]"):
        knob.validate(2.5, where="method.rho")
    with pytest.raises(ValueError, match=r"^rho = 0\.0005 is outside"):
        knob.validate(5e-4)
    assert Knob("t", 1.0, 0.0, 1.0, larger_is_more_robust=False).validate(0.0) == 0.0
    assert knob.log and knob.larger_is_more_robust


# Aimed at the survivors of the mutation run (methods/MUTANTS.md).


def test_global_weights_value_of_a_reweighting_method():
    losses = torch.tensor([0.5, 2.0, 1.0, -0.3], dtype=torch.float64)
    stats = methods.global_weights(methods.get("kl-rebel"), 0.4, losses)
    p, value = kl_weights(losses, 0.4)
    assert float(stats.value) == pytest.approx(
        0.4 * math.log(float(torch.exp(losses / 0.4).mean())), abs=1e-12
    )
    assert torch.equal(stats.weights, p) and torch.equal(stats.value, value)


def test_global_weights_carries_the_group_state():
    """Two steps of GR-DPO: alpha = softmax(eta·(L_1 + L_2)), the per-group means summed."""
    method, eta = methods.get("gr-dpo"), 0.5
    groups = torch.tensor([0, 0, 1])
    first = methods.global_weights(
        method, eta, torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64), groups=groups
    )
    second = methods.global_weights(
        method, eta, torch.tensor([2.0, 0.0, 1.5], dtype=torch.float64), groups=groups, state=first.state
    )
    c = torch.tensor([eta * (2.0 + 1.0), eta * (0.5 + 1.5)], dtype=torch.float64)
    torch.testing.assert_close(second.state["alpha"], torch.softmax(c, 0), rtol=1e-12, atol=1e-15)


def test_a_group_method_without_groups_is_a_clear_error():
    method = methods.get("gr-dpo")
    model, data = make(0)
    with pytest.raises(ValueError, match="gr-dpo needs a group id per sample"):
        methods.robust_objective(method, 0.5, losses_fn(method, model, data)(torch.arange(4))[0])
    with pytest.raises(ValueError, match="gr-dpo needs a group id per sample"):
        methods.accumulate_gradients(method, 0.5, [torch.arange(4)], losses_fn(method, model, data))


@pytest.mark.parametrize("name", ["kl-rebel", "gr-dpo"])
def test_reweighting_needs_no_penalty_inputs(name):
    """Without a Wasserstein penalty, losses_fn may return no inputs, and accumulation still works."""
    method = methods.get(name)
    model, data = make(3)
    full, _ = full_batch_grads(method, model, data)
    model.zero_grad()
    fn = losses_fn(method, model, data)
    stats = methods.accumulate_gradients(
        method,
        radius(method),
        list(torch.arange(64).split(16)),
        lambda mb: (fn(mb)[0], []),
        groups=data["groups"],
    )
    assert stats.weights.numel() == 64
    for a, p in zip(full, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_a_one_shot_iterator_of_micro_batches_never_drops_the_gradient():
    """A generator is consumed by the first pass: accumulate_gradients refuses it (or gets it right)."""
    method = methods.get("chi2-rebel")
    model, data = make(3)
    full, _ = full_batch_grads(method, model, data)
    model.zero_grad()
    batches = iter(torch.arange(64).split(16))
    try:
        methods.accumulate_gradients(method, radius(method), batches, losses_fn(method, model, data))
    except ValueError:
        return
    for a, p in zip(full, model.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_backward_robust_is_one_pass_unless_micro_batched():
    """micro_batch in (0, n): two passes over the slices; 0 (the default) or >= n: one call."""
    method = methods.get("w-rebel")
    model, data = make(3)
    calls = []
    fn = losses_fn(method, model, data)

    def counted(rows):
        calls.append(len(rows))
        return fn(rows)

    for kwargs, expected in (({}, [8]), ({"micro_batch": 8}, [8]), ({"micro_batch": 4}, [4, 4, 4, 4])):
        calls.clear()
        methods.backward_robust(method, 0.3, 8, counted, **kwargs)
        assert calls == expected, kwargs


def test_backward_robust_defaults_to_the_sqrt_mean_penalty():
    method = methods.get("w-rebel")
    model, data = make(3)
    grads = {}
    for form in (None, "sqrt_mean", "per_sample_sq"):
        model.zero_grad()
        kwargs = {} if form is None else {"w_form": form}
        stats = methods.backward_robust(method, 0.3, 16, losses_fn(method, model, data), **kwargs)
        grads[form] = ([p.grad.clone() for p in model.parameters()], stats.value)
    for a, b in zip(grads[None][0], grads["sqrt_mean"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(grads[None][1]) == float(grads["sqrt_mean"][1]) != float(grads["per_sample_sq"][1])


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_detached_keeps_float64_and_ids(monkeypatch, rank):
    from methods import distributed

    for blocks in (
        [
            torch.tensor([1 / 3, 2 / 3, 1e-300], dtype=torch.float64),
            torch.tensor([math.pi], dtype=torch.float64),
        ],
        [torch.tensor([2**40 + 1, 3]), torch.tensor([7])],
    ):
        monkeypatch.setattr(distributed, "dist", FakeDist(rank, blocks))
        full, offset = distributed.gather_detached(blocks[rank])
        assert full.dtype == blocks[0].dtype and torch.equal(full, torch.cat(blocks))
        assert offset == (0 if rank == 0 else blocks[0].numel())


def test_grad_sq_norms_names_a_bad_input():
    x = torch.randn(5, 2, requires_grad=True)
    losses = x[:2].sum(1)
    with pytest.raises(ValueError, match=r"^an input has 5 rows, not a multiple of the 2 samples$"):
        grad_sq_norms(losses, [x])


def test_registered_defaults_are_empty(scratch_registry):
    from methods.registry import AGGREGATORS, METHODS

    def bare(losses, radius):
        return methods.AGGREGATORS.get("erm").weights(losses, radius)

    scratch_registry += [(AGGREGATORS, "t-bare"), (METHODS, "t-bare-m")]
    methods.register_aggregator("t-bare", None)(bare)
    assert AGGREGATORS.get("t-bare").description == ""  # no docstring, no description
    assert methods.register_method("t-bare-m", "dpo", "t-bare", "bare").reference == ""
