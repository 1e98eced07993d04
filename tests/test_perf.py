"""bench perf: its quick version runs and reports consistent numbers (no timing assertions)."""

import json

import pytest
import torch

import methods
from bench.cli import main
from bench.loops.evaluate import _mixture_replicates, _resample_weights
from bench.studies.perf import official_chi2_search
from tasks.mixtures import pair_protocol

pytestmark = pytest.mark.slow


def test_quick_perf_reports_every_policy_method(tmp_path, capsys):
    assert main(["perf", "--quick", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "perf" / "perf.json").read_text())
    steps = {r["method"]: r for r in result["steps"]}
    assert {"rebel", "chi2-rebel", "w-rebel", "dpo", "wdpo", "w-rebel (per-sample loop)"} <= set(steps)
    for row in steps.values():
        assert row["step_s"] > 0
    assert steps["rebel"]["ratio_to_base"] == 1.0
    assert steps["chi2-rebel"]["ratio_to_base"] == pytest.approx(
        steps["chi2-rebel"]["step_s"] / steps["rebel"]["step_s"]
    )
    loop = steps["w-rebel (per-sample loop)"]
    assert loop["ratio_to_base"] == pytest.approx(loop["step_s"] / steps["w-rebel"]["step_s"])
    assert "1 torch threads" in result["machine"], "one thread unless asked"
    out = capsys.readouterr().out
    assert "Dual solvers" in out
    assert loop["loop_chunk"] >= 1 and 0 <= loop["chunk_extra_s"] < loop["step_s"]
    try:
        import trl  # noqa: F401
    except ImportError:
        assert "TRL DPOTrainer arm skipped: trl is not installed" in out
    else:
        theirs = steps["dpo (TRL DPOTrainer)"]
        assert theirs["bench_dpo_over_trl"] == pytest.approx(steps["dpo"]["step_s"] / theirs["step_s"])
        (check,) = result["trl"]["loss_check"]
        assert check["trl"] == pytest.approx(check["bench"], rel=1e-5)
        assert "bench dpo step / TRL" in out


def test_the_trl_arm_says_why_it_was_skipped(monkeypatch):
    import sys

    from bench.studies.perf import trl_line, trl_missing

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    assert trl_missing().startswith("trl is not installed")

    line = trl_line({"steps": [], "trl": {"skipped": "trl is not installed (No module named 'trl')"}})
    assert line == "TRL DPOTrainer arm skipped: trl is not installed (No module named 'trl')."


def test_the_timed_step_includes_the_reference_forward_and_clipping():
    from bench.studies.perf import PerfConfig, build_model, pair_batch, step

    policy = build_model("tiny")
    reference = build_model("tiny").eval().requires_grad_(False)
    batch = pair_batch(policy.config.vocab_size, PerfConfig(batch=4))
    stale = batch.anchor.clone()
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    step(policy, opt, methods.get("dpo"), batch, 0.0, reference)
    assert not torch.equal(batch.anchor, stale), "the anchors come from the reference's forward"
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in policy.parameters()))
    assert norm <= 1.0 + 1e-5, "gradients are clipped to norm 1 before the step"


def test_official_search_is_the_minimum_over_its_candidates():
    losses = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cands = [float(losses.min()) - 1, *torch.unique(losses).tolist(), float(losses.max()) + 1]
    f = [c + (2 * 2.0 / 50 * ((losses - c).clamp_min(0) ** 2).sum()).sqrt().item() for c in cands]
    assert official_chi2_search(losses, 2.0) == pytest.approx(min(f))


def test_bootstrap_through_head_means_equals_resampling_rows():
    """The convex shortcut (resample K head means, then mix) equals resampling every mixture's rows."""
    names = [f"h{k}" for k in range(5)]
    proto = pair_protocol(names, (0, 1), 0.5)
    heads = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    weights = _resample_weights(40, 200, gen)
    fast = _mixture_replicates(heads, proto.test, weights)
    idx = torch.randint(40, (200, 40), generator=torch.Generator().manual_seed(2))
    w = torch.tensor([m.weights for m in proto.test], dtype=torch.float64)
    slow = (heads[idx] @ w.T).mean(1)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def _perturbed_tiny(pairs: int):
    """A tiny policy a little away from its reference (so the DPO margins are not all zero)."""
    from bench.studies.perf import PerfConfig, build_model, pair_batch

    policy = build_model("tiny")
    reference = build_model("tiny").eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, reference, pair_batch(policy.config.vocab_size, PerfConfig(batch=pairs))


def test_trl_dpo_trainer_computes_the_same_loss_and_gradient_as_bench_dpo():
    """The paired TRL arm is honest: TRL's DPOTrainer and bench's dpo step give the same loss and the
    same parameter gradient on the same batch (beta 0.1, sigmoid loss)."""
    pytest.importorskip("trl")
    from bench.studies.perf import TrlDpo, bench_dpo_loss

    policy, reference, batch = _perturbed_tiny(6)
    theirs = TrlDpo(policy, reference, batch, prompt_len=16)
    assert not theirs.trainer.args.gradient_checkpointing and not theirs.trainer.args.bf16
    ours = bench_dpo_loss(policy, reference, batch)
    assert abs(float(ours) - 0.6931) > 1e-3, "the margins are not zero, so a wrong one would show"
    assert float(theirs.loss()) == pytest.approx(float(ours), rel=1e-5, abs=1e-6)

    policy.zero_grad(set_to_none=True)
    losses, _ = batch.losses(policy, methods.get("dpo"), {"beta": 0.1}, 1.0, torch.arange(batch.m))
    losses.mean().backward()
    theirs.opt.zero_grad(set_to_none=True)
    theirs.trainer.training_step(theirs.policy, theirs.inputs)
    for (name, mine), other in zip(policy.named_parameters(), theirs.policy.parameters(), strict=True):
        torch.testing.assert_close(other.grad, mine.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_per_sample_loop_gives_the_batched_w_rebel_gradient():
    """The per-sample W loop, held to ``chunk`` graphs at a time or all at once (the official single
    pass), backpropagates the same parameter gradient as the batched W-REBEL step."""
    from bench.studies.perf import _hparams, loop_wasserstein_backward

    policy, reference, batch = _perturbed_tiny(4)
    from bench.core.lm import chunked_logps

    batch.anchor = chunked_logps(reference, batch.seqs, 1.0).view(2, -1).T
    method = methods.get("w-rebel")
    rho = 0.5  # large enough that the penalty's share of the gradient is not lost in rounding

    def flat_grad():
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    policy.zero_grad(set_to_none=True)
    stats = methods.backward_robust(
        method,
        rho,
        batch.m,
        lambda rows: batch.losses(policy, method, _hparams(method), 1.0, rows),
        state={},
    )
    batched = flat_grad()
    policy.zero_grad(set_to_none=True)
    methods.backward_robust(
        method, 0.0, batch.m, lambda rows: batch.losses(policy, method, _hparams(method), 1.0, rows), state={}
    )
    no_penalty = flat_grad()
    assert (batched - no_penalty).norm() > 1e-3 * batched.norm(), "the penalty moves the gradient"
    for chunk in (0, 1, 3):
        policy.zero_grad(set_to_none=True)
        value = loop_wasserstein_backward(policy, batch, rho, chunk)
        torch.testing.assert_close(flat_grad(), batched, rtol=1e-4, atol=1e-4 * float(batched.abs().max()))
        assert float(value) == pytest.approx(float(stats.value), rel=1e-5)
