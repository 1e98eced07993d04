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
    assert "Dual solvers" in capsys.readouterr().out


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
