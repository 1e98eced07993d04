"""GR-DPO / GR-IPO group weights over several batches, against weights computed by hand.

The number of groups is the task's (``n_groups``) or grown from the ids seen; batches may lack
groups. ``group_update="official"`` is the official GR-DPO update (no renormalization over the
groups present; group losses ``S_g / share_g`` with the training set's shares).
"""

import math

import pytest
import torch
from _problem import losses_fn, make

import methods
from methods.robust import group_step, group_weights

ETA = 0.5
# Three batches: groups [0, 0, 1], then [0, 2], then [2, 2] (group 2 first appears in batch 2).
BATCHES = [
    ([1.0, 3.0, 0.5], [0, 0, 1]),
    ([4.0, 2.0], [0, 2]),
    ([1.0, 3.0], [2, 2]),
]


def softmax(c):
    z = sum(math.exp(v) for v in c)
    return [math.exp(v) / z for v in c]


def run(n_groups=None, update="bench", shares=None, batches=BATCHES, state=None):
    """Every batch's (weights, value, state) of group_step, the state carried along."""
    out = []
    for losses, groups in batches:
        p, value, state = group_step(
            torch.tensor(losses, dtype=torch.float64),
            torch.tensor(groups),
            state,
            ETA,
            n_groups=n_groups,
            update=update,
            shares=shares,
        )
        out.append((p.tolist(), float(value), state))
    return out


# Cumulative c = ETA * summed group losses (absent groups add 0); alpha = softmax(c).
# Batch 1: L = [(1+3)/2, 0.5, 0] = [2, 0.5, 0]   -> c = [1, 0.25, 0]
# Batch 2: L = [4, 0, 2]                          -> c = [3, 0.25, 1]
# Batch 3: L = [0, 0, (1+3)/2] = [0, 0, 2]        -> c = [3, 0.25, 2]
C_BENCH = [[1.0, 0.25, 0.0], [3.0, 0.25, 1.0], [3.0, 0.25, 2.0]]


@pytest.mark.parametrize("n_groups", [None, 3])
def test_bench_update_over_batches_with_absent_groups(n_groups):
    """[0,0,1] then [0,2] then [2,2]: the first batch fixed K=2 and the second raised before."""
    steps = run(n_groups=n_groups)
    for (_, _, state), c in zip(steps, C_BENCH, strict=True):
        c = c[: state["alpha"].numel()]  # growing: only groups 0, 1 after batch 1
        assert state["alpha"].tolist() == pytest.approx(softmax(c), abs=1e-12)
        assert float(state["log_norm"]) == pytest.approx(math.log(sum(math.exp(v) for v in c)), abs=1e-12)
    (p1, v1, _), (p2, v2, _), (p3, v3, _) = steps
    # Batch 1, renormalized over groups {0, 1}: w = softmax([1, 0.25]) = [0.6792, 0.3208].
    w0, w1 = softmax([1.0, 0.25])
    assert w0 == pytest.approx(0.679179, abs=1e-6)
    assert p1 == pytest.approx([w0 / 2, w0 / 2, w1], abs=1e-12)
    assert v1 == pytest.approx(2 * w0 + 0.5 * w1, abs=1e-12)
    # Batch 2, over groups {0, 2}: softmax([3, 1]) = [0.8808, 0.1192].
    w0, w2 = softmax([3.0, 1.0])
    assert p2 == pytest.approx([w0, w2], abs=1e-12)
    assert v2 == pytest.approx(4 * w0 + 2 * w2, abs=1e-12)
    # Batch 3: group 2 alone takes all the mass.
    assert p3 == pytest.approx([0.5, 0.5], abs=1e-12)
    assert v3 == pytest.approx(2.0, abs=1e-12)


def test_growth_equals_a_run_told_the_group_count():
    """Growing the state when id 2 first appears gives the states of a run with n_groups=3."""
    grown, told = run(n_groups=None), run(n_groups=3)
    assert grown[0][2]["alpha"].numel() == 2  # only groups 0, 1 seen so far
    assert grown[0][2]["alpha"].tolist() == pytest.approx(softmax([1.0, 0.25]), abs=1e-12)
    assert float(grown[0][2]["log_norm"]) == pytest.approx(math.log(math.exp(1) + math.exp(0.25)), abs=1e-12)
    for a, b in zip(grown[1:], told[1:], strict=True):
        torch.testing.assert_close(a[2]["alpha"], b[2]["alpha"], rtol=0, atol=1e-14)
        torch.testing.assert_close(a[2]["log_norm"], b[2]["log_norm"], rtol=0, atol=1e-14)
    for a, b in zip(grown, told, strict=True):  # bench weights only see the groups present
        assert a[0] == pytest.approx(b[0], abs=1e-14)
        assert a[1] == pytest.approx(b[1], abs=1e-14)


def test_growth_rule_by_hand():
    """Z = e^1 + e^0.25 after batch 1; id 2 enters with c = 0: weight 1/(Z+1), the others scale by Z/(Z+1)."""
    state = run(n_groups=None, batches=BATCHES[:1])[0][2]
    z = math.exp(1.0) + math.exp(0.25)
    _, _, grown = group_step(torch.tensor([1.0]), torch.tensor([2]), state, 0.0)
    assert grown["alpha"].tolist() == pytest.approx(
        [math.exp(1.0) / (z + 1), math.exp(0.25) / (z + 1), 1 / (z + 1)], abs=1e-12
    )
    assert float(grown["log_norm"]) == pytest.approx(math.log(z + 1), abs=1e-12)
    # A state saved without log_norm is taken to have Z = K: [0.6, 0.4] grows to [0.4, 0.8/3, 1/3].
    _, _, old = group_step(
        torch.tensor([1.0]), torch.tensor([2]), {"alpha": torch.tensor([0.6, 0.4], dtype=torch.float64)}, 0.0
    )
    assert old["alpha"].tolist() == pytest.approx([0.4, 0.8 / 3, 1 / 3], abs=1e-12)
    assert float(old["log_norm"]) == pytest.approx(math.log(3), abs=1e-12)


def test_told_group_count_grows_a_shorter_state():
    _, _, state = group_step(
        torch.tensor([1.0]), torch.tensor([0]), {"alpha": torch.tensor([1.0])}, 0.0, n_groups=4
    )
    assert state["alpha"].tolist() == pytest.approx([0.25] * 4, abs=1e-12)
    assert float(state["log_norm"]) == pytest.approx(math.log(4), abs=1e-12)


def test_official_update_without_shares_by_hand():
    """No renormalization: absent groups keep their alpha mass, so the weights do not sum to 1."""
    (p1, v1, s1), (p2, v2, s2) = run(n_groups=3, update="official", batches=BATCHES[:2])
    a = softmax([1.0, 0.25, 0.0])  # e / (e + e^0.25 + 1) = 2.7183 / 5.0023: [0.5434, 0.2567, 0.1999]
    assert a[0] == pytest.approx(0.543406, abs=1e-6)
    assert s1["alpha"].tolist() == pytest.approx(a, abs=1e-12)
    assert p1 == pytest.approx([a[0] / 2, a[0] / 2, a[1]], abs=1e-12)
    assert sum(p1) == pytest.approx(1 - a[2], abs=1e-12)
    assert v1 == pytest.approx(2 * a[0] + 0.5 * a[1], abs=1e-12)
    a = softmax([3.0, 0.25, 1.0])
    assert s2["alpha"].tolist() == pytest.approx(a, abs=1e-12)
    assert p2 == pytest.approx([a[0], a[2]], abs=1e-12)
    assert v2 == pytest.approx(4 * a[0] + 2 * a[2], abs=1e-12)


def test_official_update_with_shares_by_hand():
    """L_g = N·S_g / N_g = S_g / share_g (the official divide_by_totalcount), weight alpha_g / share_g."""
    counts = [50, 25, 25]  # the training set's group sizes: shares [0.5, 0.25, 0.25]
    (p1, v1, s1), (p2, v2, s2) = run(n_groups=3, update="official", shares=counts, batches=BATCHES[:2])
    # Batch 1: S = [4, 0.5, 0] -> L = [8, 2, 0] -> c = [4, 1, 0].
    a = softmax([4.0, 1.0, 0.0])
    assert s1["alpha"].tolist() == pytest.approx(a, abs=1e-12)
    assert p1 == pytest.approx([a[0] / 0.5, a[0] / 0.5, a[1] / 0.25], abs=1e-12)
    assert v1 == pytest.approx(8 * a[0] + 2 * a[1], abs=1e-12)
    # Batch 2: S = [4, 0, 2] -> L = [8, 0, 8] -> c = [8, 1, 4].
    a = softmax([8.0, 1.0, 4.0])
    assert s2["alpha"].tolist() == pytest.approx(a, abs=1e-12)
    assert p2 == pytest.approx([a[0] / 0.5, a[2] / 0.25], abs=1e-12)
    assert v2 == pytest.approx(8 * a[0] + 8 * a[2], abs=1e-12)
    # Fractions and counts are the same shares.
    (q1, w1, _), _ = run(n_groups=3, update="official", shares=[0.5, 0.25, 0.25], batches=BATCHES[:2])
    assert q1 == pytest.approx(p1, abs=1e-12)
    assert w1 == pytest.approx(v1, abs=1e-12)


def test_bench_ignores_shares():
    assert run(n_groups=3, shares=[50, 25, 25])[1][:2] == run(n_groups=3)[1][:2]


def test_group_weights_keeps_its_alpha_length():
    """The stateless form: K = len(alpha), ids outside raise."""
    p, value, alpha = group_weights(
        torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), torch.tensor([0.5, 0.5]), 1.0
    )
    # alpha ∝ [0.5 e^2, 0.5 e^0]; only group 0 present: each sample 1/2.
    assert alpha.tolist() == pytest.approx([math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)], abs=1e-7)
    assert alpha.dtype == torch.float64 and p.dtype == torch.float32  # the state in float64
    assert p.tolist() == pytest.approx([0.5, 0.5], abs=1e-7)
    assert float(value) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"ids in \[0, 2\)"):
        group_weights(torch.tensor([1.0]), torch.tensor([2]), torch.tensor([0.5, 0.5]), 1.0)


@pytest.mark.parametrize(
    ("kwargs", "state", "groups", "match"),
    [
        ({"update": "paper"}, None, [0], r"^unknown group update 'paper'; known: bench, official$"),
        ({"n_groups": 2}, None, [2], r"ids in \[0, 2\)"),
        ({"n_groups": 1}, {"alpha": torch.tensor([0.5, 0.5])}, [0], "holds 2 groups"),
        ({"n_groups": 0}, None, [0], "n_groups = 0"),
        ({}, None, [-1], r"^groups must be non-negative ids with the shape of losses$"),
        ({"n_groups": 2, "update": "official", "shares": [1.0]}, None, [0], "2 non-negative numbers"),
        ({"n_groups": 2, "update": "official", "shares": [1.0, -1.0]}, None, [0], "non-negative numbers"),
        ({"n_groups": 2, "update": "official", "shares": [0.0, 0.0]}, None, [0], "non-negative numbers"),
        ({"n_groups": 2, "update": "official", "shares": [1.0, math.nan]}, None, [0], "non-negative numbers"),
        (
            {"n_groups": 2, "update": "official", "shares": [1.0, 0.0]},
            None,
            [1],
            r"^a group with share 0 in the training set appears in the batch$",
        ),
    ],
)
def test_clear_errors(kwargs, state, groups, match):
    with pytest.raises(ValueError, match=match):
        group_step(torch.ones(len(groups)), torch.tensor(groups), state, ETA, **kwargs)


def test_a_zero_share_group_absent_from_the_batch_is_fine():
    p, _, _ = group_step(
        torch.tensor([2.0], dtype=torch.float64),
        torch.tensor([0]),
        None,
        ETA,
        n_groups=2,
        update="official",
        shares=[1.0, 0.0],
    )
    a = softmax([1.0, 0.0])  # L = [2 / 1, 0]
    assert p.tolist() == pytest.approx([a[0]], abs=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape of losses"):
        group_step(torch.ones(3), torch.tensor([0, 1]), None, ETA)


def steps_through_the_objective(method, micro, **kwargs):
    """Three steps of a small model through backward_robust: batches with absent groups."""
    model, data = make(5)
    rows = [torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9]), torch.tensor([10, 11, 12])]
    data["groups"][rows[0]] = torch.tensor([0, 0, 0, 1, 1, 0])
    data["groups"][rows[1]] = torch.tensor([0, 2, 2, 0])
    data["groups"][rows[2]] = torch.tensor([2, 2, 2])
    state, out = {}, []
    for idx in rows:
        model.zero_grad()
        fn = losses_fn(method, model, data)
        stats = methods.backward_robust(
            method, 0.5, len(idx), lambda r, idx=idx, fn=fn: fn(idx[r]), micro_batch=micro,
            groups=data["groups"][idx], state=state, **kwargs,
        )  # fmt: skip
        state = stats.state
        out.append(([p.grad.clone() for p in model.parameters()], stats))
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"group_options": methods.GroupOptions(3)},
        {"group_options": methods.GroupOptions(3, "official", [3, 2, 1])},
    ],
)
def test_backward_robust_over_batches_with_absent_groups(kwargs):
    """backward_robust threads the group options: one pass and micro-batches of 2 agree, and the
    gradient is sum_g alpha_g grad L_g with the updated alpha held fixed."""
    method = methods.get("gr-ipo")
    full, acc = (
        steps_through_the_objective(method, 0, **kwargs),
        steps_through_the_objective(method, 2, **kwargs),
    )
    shares = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 6
    for (g_full, s_full), (g_acc, s_acc) in zip(full, acc, strict=True):
        torch.testing.assert_close(s_full.state["alpha"], s_acc.state["alpha"], rtol=0, atol=1e-14)
        torch.testing.assert_close(s_full.value, s_acc.value, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_full, g_acc, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert full[-1][1].state["alpha"].numel() == 3
    # The third batch holds only group 2: bench weights it 1/3 each, official alpha_2 / share_2.
    alpha2 = float(full[-1][1].state["alpha"][2])
    official = "group_options" in kwargs and kwargs["group_options"].update == "official"
    expected = alpha2 / float(shares[2]) if official else 1 / 3
    assert full[-1][1].weights.tolist() == pytest.approx([expected] * 3, abs=1e-12)


def test_the_official_gradient_holds_alpha_fixed():
    method = methods.get("gr-dpo")
    model, data = make(6)
    data["groups"] = data["groups"].clamp(max=1)  # group 2 absent from this batch
    model.zero_grad()
    losses, _ = losses_fn(method, model, data)(torch.arange(64))
    obj = methods.robust_objective(
        method,
        0.5,
        losses,
        groups=data["groups"],
        group_options=methods.GroupOptions(3, "official", [2, 1, 1]),
    )
    obj.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    losses, _ = losses_fn(method, model, data)(torch.arange(64))
    alpha = obj.stats.state["alpha"]
    shares = [0.5, 0.25, 0.25]
    group_loss = torch.stack([losses[data["groups"] == g].sum() / shares[g] for g in range(2)])
    (alpha[:2] * group_loss).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    assert float(alpha[2]) > 0  # the absent group keeps its mass (no renormalization)
    assert float(obj.stats.value) == pytest.approx(float((alpha[:2] * group_loss).sum().detach()), rel=1e-12)


# Aimed at the survivors of the mutation run (methods/MUTANTS.md).


def test_eta_alpha_errors_name_it():
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match=r"^eta_alpha must lie in \[0, inf\], got"):
            group_step(torch.ones(2), torch.tensor([0, 1]), None, bad)


def test_group_ids_of_any_dtype():
    """uint8, int32 or float ids (e.g. a dataset column) give the int64 ids' step."""
    losses = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)
    ids = [0, 1, 1, 2]
    expected = group_step(losses, torch.tensor(ids), None, ETA)
    for dtype in (torch.uint8, torch.int32, torch.float64):
        p, value, state = group_step(losses, torch.tensor(ids, dtype=dtype), None, ETA)
        assert torch.equal(p, expected[0]) and torch.equal(value, expected[1])
        assert torch.equal(state["alpha"], expected[2]["alpha"])


def test_float32_losses_get_float32_weights_and_value():
    for update in ("bench", "official"):
        p, value, state = group_step(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), None, ETA, update=update)
        assert p.dtype == value.dtype == torch.float32 and state["alpha"].dtype == torch.float64


def test_one_group_is_the_mean():
    losses = torch.tensor([1.0, 3.0, 0.5, 2.5], dtype=torch.float64)
    for update in ("bench", "official"):
        p, value, state = group_step(
            losses, torch.zeros(4, dtype=torch.long), None, ETA, n_groups=1, update=update
        )
        assert p.tolist() == pytest.approx([0.25] * 4, abs=1e-15)
        assert float(value) == pytest.approx(1.75, abs=1e-15)
        assert state["alpha"].tolist() == [1.0]


def test_a_float32_state_is_continued_in_float64():
    """A state saved in float32 (a checkpoint) steps exactly like its float64 copy."""
    losses = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float32)
    for n_groups in (3, 4):  # as is, and grown
        for extra in ({}, {"log_norm": 1.3}):
            a = group_step(losses, torch.tensor([0, 1, 2]), {"alpha": alpha, **extra}, ETA, n_groups=n_groups)
            b = group_step(
                losses, torch.tensor([0, 1, 2]), {"alpha": alpha.double(), **extra}, ETA, n_groups=n_groups
            )
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert torch.equal(a[2]["alpha"], b[2]["alpha"]) and a[2]["alpha"].dtype == torch.float64
    new = group_weights(losses, torch.tensor([0, 1, 2]), alpha, ETA)[2]
    assert torch.equal(new, group_weights(losses, torch.tensor([0, 1, 2]), alpha.double(), ETA)[2])
