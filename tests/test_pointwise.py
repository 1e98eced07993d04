"""Pointwise losses against formulas written here in plain ``math``, closed forms and limits.

Notation: a pair's log-ratio margin is ``h = [lp1 - a1] - [lp2 - a2]`` (policy log-probs lp,
anchor log-probs a), ``dr = r1 - r2`` and ``p`` the probability that the first response wins.
"""

import math

import pytest
import torch

import methods
from methods.pointwise import (
    PairScores,
    bradley_terry_pref,
    bt_loss,
    dpo_loss,
    ipo_loss,
    preference_labels,
    rebel_loss,
)

# Hand-picked pairs: (lp1, lp2, a1, a2, r1, r2, p), anchors nonzero and asymmetric.
PAIRS = [
    (-3.0, -5.0, -4.0, -4.5, 0.9, 0.2, 1.0),  # h = 1 - (-0.5) = 1.5, dr = 0.7
    (-2.0, -1.0, -1.5, -3.0, 0.1, 0.6, 0.0),  # h = -0.5 - 2 = -2.5, dr = -0.5
    (-7.0, -6.5, -6.0, -6.0, 0.4, 0.4, 0.3),  # h = -1 - (-0.5) = -0.5, dr = 0
    (-1.0, -4.0, -2.0, -1.0, -0.3, 0.5, 0.8),  # h = 1 - (-3) = 4, dr = -0.8
]


def scores(pairs=PAIRS, anchor=True, dtype=torch.float64, requires_grad=False):
    t = torch.tensor(pairs, dtype=dtype)
    lp = t[:, 0:2].clone().requires_grad_(requires_grad)
    return PairScores(lp, t[:, 2:4] if anchor else None, t[:, 4:6], t[:, 6])


def margin(lp1, lp2, a1, a2):
    return (lp1 - a1) - (lp2 - a2)


def log_sigmoid(z):
    """log(1 / (1 + e^-z)), stable on both sides."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def ref_rebel(row, eta, form):
    lp1, lp2, a1, a2, r1, r2, _ = row
    h, dr = margin(lp1, lp2, a1, a2), r1 - r2
    return (h / eta - dr) ** 2 if form == "inv_eta" else (h - eta * dr) ** 2


def ref_dpo(row, beta):
    lp1, lp2, a1, a2, _, _, p = row
    z = beta * margin(lp1, lp2, a1, a2)
    return -(p * log_sigmoid(z) + (1 - p) * log_sigmoid(-z))


def ref_ipo(row, beta):
    lp1, lp2, a1, a2, _, _, p = row
    h = margin(lp1, lp2, a1, a2)
    return p * (h - 1 / (2 * beta)) ** 2 + (1 - p) * (h + 1 / (2 * beta)) ** 2


def ref_bt(row):
    s1, s2, _, _, _, _, p = row  # the reward model's scores sit in policy_logps
    return -(p * log_sigmoid(s1 - s2) + (1 - p) * log_sigmoid(s2 - s1))


def values(t):
    return [float(v) for v in t]


def test_margin_uses_policy_minus_anchor():
    assert values(scores().log_ratio_margin()) == pytest.approx([1.5, -2.5, -0.5, 4.0], abs=1e-15)
    assert values(scores(anchor=False).log_ratio_margin()) == pytest.approx([2.0, -1.0, -0.5, 3.0], abs=1e-15)


@pytest.mark.parametrize("eta", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("form", ["inv_eta", "eta_reward"])
def test_rebel_matches_the_formula(eta, form):
    expected = [ref_rebel(row, eta, form) for row in PAIRS]
    assert values(rebel_loss(scores(), eta, form)) == pytest.approx(expected, rel=1e-14, abs=1e-14)


def test_rebel_by_hand():
    # Pair 0: h = 1.5, dr = 0.7. eta = 0.5: (1.5/0.5 - 0.7)^2 = 2.3^2 = 5.29; (1.5 - 0.35)^2 = 1.3225.
    assert float(rebel_loss(scores(), 0.5)[0]) == pytest.approx(5.29, abs=1e-12)
    assert float(rebel_loss(scores(), 0.5, form="eta_reward")[0]) == pytest.approx(1.3225, abs=1e-12)
    assert float(rebel_loss(scores(), 0.5, form="inv_eta")[3]) == pytest.approx((8 + 0.8) ** 2, abs=1e-12)


@pytest.mark.parametrize("form", ["inv_eta", "eta_reward"])
def test_rebel_is_zero_at_h_equal_eta_dr(form):
    """Both forms vanish where h / eta = dr and only there."""
    eta, dr = 0.25, 0.8
    h = eta * dr
    row = (h, 0.0, 0.0, 0.0, dr, 0.0, 1.0)
    assert float(rebel_loss(scores([row]), eta, form)[0]) == pytest.approx(0.0, abs=1e-15)
    off = (h + 0.1, 0.0, 0.0, 0.0, dr, 0.0, 1.0)
    scale = 1 / eta if form == "inv_eta" else 1.0
    assert float(rebel_loss(scores([off]), eta, form)[0]) == pytest.approx((0.1 * scale) ** 2, rel=1e-12)


def test_rebel_forms_differ_by_eta_squared():
    eta = 0.3
    inv, direct = rebel_loss(scores(), eta, "inv_eta"), rebel_loss(scores(), eta, "eta_reward")
    torch.testing.assert_close(direct, eta**2 * inv, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("beta", [0.1, 0.7, 2.0])
def test_dpo_matches_the_formula(beta):
    expected = [ref_dpo(row, beta) for row in PAIRS]
    assert values(dpo_loss(scores(), beta)) == pytest.approx(expected, rel=1e-13, abs=1e-15)


def test_dpo_by_hand():
    # Pair 0, p = 1, beta = 2/3: z = 1, -log σ(1) = log(1 + e^-1) = 0.3132617.
    assert float(dpo_loss(scores(), 2 / 3)[0]) == pytest.approx(0.3132617, abs=1e-7)
    # Pair 1, p = 0, beta = 0.4: z = -1, -log σ(1) = 0.3132617 again (the label is the second).
    assert float(dpo_loss(scores(), 0.4)[1]) == pytest.approx(0.3132617, abs=1e-7)
    # Pair 2, p = 0.3, beta = 2: z = -1: -(0.3 log σ(-1) + 0.7 log σ(1)) = 0.3·1.3132617 + 0.7·0.3132617.
    assert float(dpo_loss(scores(), 2.0)[2]) == pytest.approx(0.6132617, abs=1e-7)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 1.0])
def test_dpo_at_zero_margin_is_log_two(p):
    row = (-1.0, -2.0, -1.0, -2.0, 0.0, 0.0, p)  # h = 0
    assert float(dpo_loss(scores([row]), 0.9)[0]) == pytest.approx(math.log(2), abs=1e-15)


def test_dpo_limits_are_finite_and_exact():
    """p = 1: -> 0 as beta·h -> +inf, ~ -beta·h as beta·h -> -inf (no overflow, no NaN)."""
    rows = [(h, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0) for h in (30.0, 1e4, -1e4)]
    loss = values(dpo_loss(scores(rows), 1.5))
    assert loss[0] == pytest.approx(math.exp(-45.0), rel=1e-10)  # log(1 + e^-45) ~ e^-45
    assert loss[1] == 0.0
    assert loss[2] == pytest.approx(1.5e4, rel=1e-12)


def test_soft_dpo_is_minimized_where_sigmoid_matches_the_label():
    """dL/dh = beta·(σ(beta·h) - p): zero at h = logit(p) / beta."""
    beta, p = 0.5, 0.8
    h = math.log(p / (1 - p)) / beta
    row = torch.tensor([[h, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = dpo_loss(
        PairScores(row, torch.zeros(1, 2, dtype=torch.float64), pref=torch.tensor([p], dtype=torch.float64)),
        beta,
    )
    (grad,) = torch.autograd.grad(loss.sum(), row)
    assert float(grad[0, 0]) == pytest.approx(0.0, abs=1e-15)
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))  # the minimum is the label's entropy
    assert float(loss[0].detach()) == pytest.approx(entropy, abs=1e-14)


@pytest.mark.parametrize("beta", [0.1, 0.25, 2.0])
def test_ipo_matches_the_formula(beta):
    expected = [ref_ipo(row, beta) for row in PAIRS]
    assert values(ipo_loss(scores(), beta)) == pytest.approx(expected, rel=1e-13, abs=1e-14)


def test_ipo_by_hand():
    # Pair 0, p = 1, beta = 0.25: target 1/(2·0.25) = 2, (1.5 - 2)^2 = 0.25.
    assert float(ipo_loss(scores(), 0.25)[0]) == pytest.approx(0.25, abs=1e-14)
    # Pair 1, p = 0, beta = 0.25: (h + 2)^2 = (-2.5 + 2)^2 = 0.25.
    assert float(ipo_loss(scores(), 0.25)[1]) == pytest.approx(0.25, abs=1e-14)


@pytest.mark.parametrize("p", [1.0, 0.7, 0.5, 0.0])
def test_ipo_is_minimized_at_its_target(p):
    """Minimizer h* = (2p - 1) / (2 beta): 1/(2 beta) for p = 1; the loss is 0 there for hard labels."""
    beta = 0.4
    h_star = (2 * p - 1) / (2 * beta)
    grid = [h_star + d for d in (-0.1, 0.0, 0.1)]
    loss = values(ipo_loss(scores([(h, 0.0, 0.0, 0.0, 0.0, 0.0, p) for h in grid]), beta))
    assert loss[1] < loss[0] and loss[1] < loss[2]
    assert loss[0] == pytest.approx(loss[2], rel=1e-12)  # a parabola around h*
    if p in (0.0, 1.0):
        assert loss[1] == pytest.approx(0.0, abs=1e-15)
        assert h_star == pytest.approx((1 if p else -1) * 1.25)


def test_bt_matches_the_formula():
    expected = [ref_bt(row) for row in PAIRS]
    assert values(bt_loss(scores())) == pytest.approx(expected, rel=1e-13, abs=1e-15)
    # Pair 0: scores -3 vs -5, p = 1: -log σ(2) = log(1 + e^-2) = 0.126928.
    assert float(bt_loss(scores())[0]) == pytest.approx(0.126928, abs=1e-6)


def swapped(pairs):
    """The two responses exchanged and p -> 1 - p."""
    return [(lp2, lp1, a2, a1, r2, r1, 1 - p) for lp1, lp2, a1, a2, r1, r2, p in pairs]


@pytest.mark.parametrize(
    "loss",
    [
        lambda s: rebel_loss(s, 0.3),
        lambda s: rebel_loss(s, 0.3, form="eta_reward"),
        lambda s: dpo_loss(s, 0.7),
        lambda s: ipo_loss(s, 0.4),
        bt_loss,
    ],
    ids=["rebel", "rebel-eta-reward", "dpo", "ipo", "bt"],
)
def test_swapping_the_responses_and_the_label_changes_nothing(loss):
    torch.testing.assert_close(loss(scores(swapped(PAIRS))), loss(scores()), rtol=1e-13, atol=1e-15)


def fd_grad(loss_of_row, row, j, h=1e-6):
    up, down = list(row), list(row)
    up[j] += h
    down[j] -= h
    return (loss_of_row(up) - loss_of_row(down)) / (2 * h)


@pytest.mark.parametrize(
    ("loss", "ref"),
    [
        (lambda s: rebel_loss(s, 0.6), lambda r: ref_rebel(r, 0.6, "inv_eta")),
        (lambda s: rebel_loss(s, 0.6, form="eta_reward"), lambda r: ref_rebel(r, 0.6, "eta_reward")),
        (lambda s: dpo_loss(s, 0.7), lambda r: ref_dpo(r, 0.7)),
        (lambda s: ipo_loss(s, 0.4), lambda r: ref_ipo(r, 0.4)),
        (bt_loss, ref_bt),
    ],
    ids=["rebel", "rebel-eta-reward", "dpo", "ipo", "bt"],
)
def test_gradients_match_finite_differences_of_the_formula(loss, ref):
    s = scores(requires_grad=True)
    (grad,) = torch.autograd.grad(loss(s).sum(), s.policy_logps)
    for i, row in enumerate(PAIRS):
        for j in (0, 1):
            assert float(grad[i, j]) == pytest.approx(fd_grad(ref, row, j), rel=1e-6, abs=1e-8)


def test_dpo_gradient_closed_form():
    """dL/d lp1 = -beta·(p - σ(beta·h)) = -dL/d lp2."""
    beta = 0.7
    s = scores(requires_grad=True)
    (grad,) = torch.autograd.grad(dpo_loss(s, beta).sum(), s.policy_logps)
    for i, (lp1, lp2, a1, a2, _, _, p) in enumerate(PAIRS):
        g = -beta * (p - 1 / (1 + math.exp(-beta * margin(lp1, lp2, a1, a2))))
        assert float(grad[i, 0]) == pytest.approx(g, rel=1e-12)
        assert float(grad[i, 1]) == pytest.approx(-g, rel=1e-12)


def test_losses_keep_float32_and_accept_integer_labels():
    s = scores(dtype=torch.float32)
    s.pref = s.pref.round().long()  # 0/1 integer labels become the loss's dtype
    for out in (dpo_loss(s, 0.5), ipo_loss(s, 0.5), bt_loss(s), rebel_loss(s, 0.5)):
        assert out.dtype == torch.float32 and out.shape == (4,)


def test_registry_routes_to_these_losses():
    torch.testing.assert_close(
        methods.pointwise_losses(methods.get("dpo"), scores(), beta=0.7), dpo_loss(scores(), 0.7)
    )
    torch.testing.assert_close(
        methods.pointwise_losses(methods.get("w-rebel"), scores(), eta=0.3, form="eta_reward"),
        rebel_loss(scores(), 0.3, "eta_reward"),
    )
    torch.testing.assert_close(
        methods.pointwise_losses(methods.get("gr-ipo"), scores(), beta=0.4), ipo_loss(scores(), 0.4)
    )
    torch.testing.assert_close(methods.pointwise_losses(methods.get("tv-bt"), scores()), bt_loss(scores()))


def test_missing_inputs_and_bad_arguments_raise():
    no_anchor = scores(anchor=False)
    for fn in (lambda s: rebel_loss(s, 1.0), lambda s: dpo_loss(s, 1.0), lambda s: ipo_loss(s, 1.0)):
        with pytest.raises(ValueError, match="needs anchor_logps"):
            fn(no_anchor)
    with pytest.raises(ValueError, match="needs rewards"):
        rebel_loss(PairScores(torch.zeros(1, 2), torch.zeros(1, 2)), 1.0)
    with pytest.raises(ValueError, match="needs pref"):
        bt_loss(PairScores(torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="needs anchor_logps, pref"):
        dpo_loss(PairScores(torch.zeros(1, 2)), 1.0)
    for eta in (0.0, -1.0):
        with pytest.raises(ValueError, match="eta must be > 0"):
            rebel_loss(scores(), eta)
    with pytest.raises(ValueError, match="unknown REBEL loss form 'paper'"):
        rebel_loss(scores(), 1.0, form="paper")


REWARDS = torch.tensor([[0.9, 0.2], [0.1, 0.6], [0.4, 0.4], [-3.0, 5.0]], dtype=torch.float64)


def test_bradley_terry_pref_by_hand():
    expected = [1 / (1 + math.exp(-(r1 - r2))) for r1, r2 in REWARDS.tolist()]
    assert values(bradley_terry_pref(REWARDS)) == pytest.approx(expected, rel=1e-14)
    assert float(bradley_terry_pref(REWARDS)[0]) == pytest.approx(0.668188, abs=1e-6)  # σ(0.7)
    assert float(bradley_terry_pref(REWARDS)[2]) == 0.5


def test_soft_and_argmax_labels():
    assert values(preference_labels(REWARDS, "soft")) == values(bradley_terry_pref(REWARDS))
    argmax = preference_labels(REWARDS, "argmax")
    assert values(argmax) == [1.0, 0.0, 1.0, 0.0]  # a tie goes to the first response
    assert argmax.dtype == REWARDS.dtype


def test_bernoulli_labels_are_bt_samples():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.tensor([[0.7, 0.0], [0.0, 0.0], [40.0, 0.0], [0.0, 40.0]], dtype=torch.float64).repeat(
        4000, 1
    )
    labels = preference_labels(rewards, "bernoulli", gen).view(-1, 4)
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    freq = labels.mean(0).tolist()
    assert freq[0] == pytest.approx(1 / (1 + math.exp(-0.7)), abs=0.025)  # 0.668, sd 0.0074
    assert freq[1] == pytest.approx(0.5, abs=0.025)
    assert freq[2:] == [1.0, 0.0]
    again = preference_labels(rewards, "bernoulli", torch.Generator().manual_seed(3)).view(-1, 4)
    assert torch.equal(labels, again)  # the generator decides


def test_unknown_label_kind_raises():
    with pytest.raises(ValueError, match="unknown label kind 'hard'"):
        preference_labels(REWARDS, "hard")


def test_label_losses_need_pref_and_keep_the_policy_dtype():
    no_pref = PairScores(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    for fn in (lambda s: dpo_loss(s, 1.0), lambda s: ipo_loss(s, 1.0)):
        with pytest.raises(ValueError, match=r"^this loss needs pref in the pair scores$"):
            fn(no_pref)
    s = scores(dtype=torch.float32)
    s.pref = s.pref.double()  # float64 labels do not promote float32 losses
    for out in (dpo_loss(s, 0.5), ipo_loss(s, 0.5), bt_loss(s)):
        assert out.dtype == torch.float32


def test_only_the_rebel_family_takes_log_probs_at_the_sampling_temperature():
    """The official conventions: REBEL divides logits by the sampling temperature, TRL's DPO, WDPO,
    KLDPO, Dr. DPO, GR-DPO, IPO and reward models do not (methods.registry)."""
    at_t = {name for name in methods.names() if methods.get(name).logps_at_sampling_temperature}
    assert at_t == {name for name in methods.names() if methods.get(name).loss == "rebel"}
    assert "w-rebel" in at_t and "dpo" not in at_t and "ipo" not in at_t and "bt" not in at_t
