"""A small differentiable preference problem shared by the gradient-invariance tests."""

import torch

import methods
from methods import PairScores

HPARAMS = {"rebel": {"eta": 0.5}, "dpo": {"beta": 0.7}, "ipo": {"beta": 0.7}, "bt": {}}
RADII = {"chi2": 0.3, "kl": 0.4, "kl-ball": 0.1, "tv": 0.2, "softmin": 0.8, "wasserstein": 0.3, "group": 0.5}
N, D = 64, 5


def make(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    data = {
        "x": torch.randn(N, 2, D, generator=gen, dtype=torch.float64),
        "anchor": torch.randn(N, 2, generator=gen, dtype=torch.float64),
        "rewards": torch.randn(N, 2, generator=gen, dtype=torch.float64),
        "pref": torch.rand(N, generator=gen, dtype=torch.float64),
        "groups": torch.randint(0, 3, (N,), generator=gen),
    }
    return model, data


def losses_fn(method, model, data):
    """Closure: indices of a micro-batch -> (per-sample losses, [inputs])."""

    def fn(idx):
        x = data["x"][idx].clone().requires_grad_(True)
        scores = PairScores(
            model(x).squeeze(-1), data["anchor"][idx], data["rewards"][idx], data["pref"][idx]
        )
        return methods.pointwise_losses(method, scores, **HPARAMS[method.loss]), [x]

    return fn


def radius(method) -> float:
    return RADII.get(method.aggregator.name, 0.0)


def full_batch_grads(method, model, data, idx=None):
    idx = torch.arange(N) if idx is None else idx
    model.zero_grad()
    losses, inputs = losses_fn(method, model, data)(idx)
    obj = methods.robust_objective(method, radius(method), losses, inputs=inputs, groups=data["groups"][idx])
    obj.loss.backward()
    return [p.grad.clone() for p in model.parameters()], obj.stats


def accumulated_grads(method, model, data, micro: int):
    model.zero_grad()
    batches = list(torch.arange(N).split(micro))
    stats = methods.accumulate_gradients(
        method, radius(method), batches, losses_fn(method, model, data), groups=data["groups"]
    )
    return [p.grad.clone() for p in model.parameters()], stats
