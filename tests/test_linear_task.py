"""The linear task's exact quantities against brute force on a small instance."""

import itertools
import math

import pytest
import torch

from bench.loops.config import build_config
from bench.loops.evaluate import mixture_scores
from bench.loops.linear import target_parameter
from tasks.linear import LinearConfig, LinearTask

SMALL = LinearConfig(d=3, n=5, n_val=4, n_test=6, actions=3, objectives=3, groups=2)


def test_expected_rewards_and_kl_by_brute_force():
    task = LinearTask(SMALL)
    theta = [0.7, -1.2, 0.4]
    heads = task.expected_heads(torch.tensor(theta, dtype=torch.float64), "test")
    phi = task.test.phi.tolist()
    objectives, ref = task.objectives.tolist(), task.theta_ref.tolist()

    def dot(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True))

    kl_total = 0.0
    for x, feats in enumerate(phi):
        w = [math.exp(dot(theta, f)) for f in feats]
        wr = [math.exp(dot(ref, f)) for f in feats]
        p = [v / sum(w) for v in w]
        q = [v / sum(wr) for v in wr]
        for k, obj in enumerate(objectives):
            brute = sum(p[a] * dot(obj, feats[a]) for a in range(3))
            assert float(heads[x, k]) == pytest.approx(brute, abs=1e-12)
        kl_total += sum(p[a] * math.log(p[a] / q[a]) for a in range(3))
    kl = task.kl_to_reference(torch.tensor(theta, dtype=torch.float64), "test")
    assert float(kl) == pytest.approx(kl_total / len(phi), abs=1e-12)


def test_expected_reward_matches_monte_carlo_sampling():
    task = LinearTask(LinearConfig(d=4, n_test=200, actions=5))
    theta = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = task.expected_heads(theta, "test").mean(0)
    probs = task.log_policy(theta, task.test.phi).exp()
    draws = torch.multinomial(probs, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    sampled = task.heads(task.test.phi)[torch.arange(200)[:, None], draws].mean((0, 1))
    torch.testing.assert_close(sampled, exact, atol=5e-3, rtol=0)


def test_mixture_metrics_are_min_and_mean_over_the_test_mixtures():
    task = LinearTask(SMALL)
    theta = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)
    test, val = task.expected_heads(theta, "test"), task.expected_heads(theta, "val")
    scores = mixture_scores(test, val, task.protocol, bootstrap=200)
    by_hand = [
        float((test @ torch.tensor(m.weights, dtype=torch.float64)).mean()) for m in task.protocol.test
    ]
    assert scores["worst_case"] == pytest.approx(min(by_hand), abs=1e-12)
    assert scores["mean_over_test"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)
    row = scores["mixtures"][scores["worst_mixture"]]
    assert row["ci_low"] <= row["reward"] <= row["ci_high"]
    names = {m.name for m in task.protocol.test} & {m.name for m in task.protocol.val}
    assert not names, "validation and test mixtures must be disjoint"
    assert any(m.weights[2] > 0 for m in task.protocol.test), "tests include an unseen objective"


def test_target_parameter_minimizes_the_population_rebel_loss():
    cfg = build_config("linear", "rebel", ["task.d=3", "task.actions=4", "method.eta=0.5"])
    task = LinearTask(LinearConfig(d=3, actions=4))
    theta_star = target_parameter(cfg, task)
    w = task.train_weights() @ task.objectives
    phi = task.train.phi
    pairs = list(itertools.combinations(range(4), 2))
    # Every pair's noiseless REBEL residual vanishes at theta*: the regression is realizable.
    for a, b in pairs:
        diff = phi[:, a] - phi[:, b]
        resid = (diff @ (theta_star - task.theta_ref)) / 0.5 - diff @ w
        assert float(resid.abs().max()) < 1e-12


def test_instances_are_reproducible_and_seed_independent():
    a, b = LinearTask(SMALL), LinearTask(SMALL)
    assert torch.equal(a.train.phi, b.train.phi) and torch.equal(a.objectives, b.objectives)
    other = LinearTask(LinearConfig(**{**SMALL.__dict__, "instance": 1}))
    assert not torch.equal(a.train.phi, other.train.phi)


def test_bad_task_config_is_rejected_with_the_key():
    with pytest.raises(ValueError, match=r"task\.actions"):
        build_config("linear", "rebel", ["task.actions=1"])


def test_group_methods_get_the_tasks_groups_and_the_chosen_update(tmp_path, monkeypatch):
    """The linear loop hands GR-DPO the task's group count and training shares and the configured
    update: the official update trains to other numbers than bench's, and both see K = task.groups
    from the first step (through robust.group_step)."""
    import methods.robust as robust
    from bench.loops import linear

    seen = []
    real = robust.group_step

    def spy(losses, groups, state, eta_alpha, **kwargs):
        seen.append(kwargs)
        return real(losses, groups, state, eta_alpha, **kwargs)

    monkeypatch.setattr(robust, "group_step", spy)
    over = ["task.groups=4", "train.iterations=3", "train.batch_size=8", "train.eval_every=3"]
    finals = {}
    for update in ("bench", "official"):
        cfg = build_config("linear", "gr-dpo", [*over, f"method.group_update={update}"])
        task = LinearTask(LinearConfig(**{k: v for k, v in cfg.task.items()}))
        finals[update] = linear.train(cfg, task, tmp_path)["metrics"]["worst_case"]
        counts = torch.bincount(task.train.groups, minlength=4).double()
        assert all(k["n_groups"] == 4 and k["update"] == update for k in seen[-3:])
        torch.testing.assert_close(torch.as_tensor(seen[-1]["shares"]), counts)
    assert finals["bench"] != finals["official"]


def test_the_worst_case_is_selected_on_validation_prompts_and_scored_on_test_prompts():
    """worst_case_selected: the test mixture worst on the validation prompts, its test-prompt mean
    (not the min over test means); recomputed here with plain matrix products."""
    from tasks.mixtures import pair_protocol

    protocol = pair_protocol(["a", "b", "c"], (0, 1), 0.5)
    gen = torch.Generator().manual_seed(3)
    test = torch.rand(40, 3, generator=gen, dtype=torch.float64)
    val = torch.rand(30, 3, generator=gen, dtype=torch.float64)
    val[:, 2] -= 0.5  # objective c is worst on the validation prompts only
    test[:, 0] -= 0.5  # a is worst on the test prompts
    w = torch.tensor([m.weights for m in protocol.test], dtype=torch.float64)  # [M, K]
    pick = int((val @ w.T).mean(0).argmin())
    scores = mixture_scores(test, val, protocol, bootstrap=0)
    assert scores["selected_mixture"] == protocol.test[pick].name and "c" in protocol.test[pick].name
    assert scores["worst_case_selected"] == pytest.approx(float((test @ w[pick]).mean()), abs=1e-12)
    assert scores["worst_case"] == pytest.approx(float((test @ w.T).mean(0).min()), abs=1e-12)
    assert scores["worst_case"] < scores["worst_case_selected"]
    assert len(scores["per_prompt"]["test"]) == 40 and len(scores["per_prompt"]["val"][0]) == 3
