"""Wasserstein ambiguity set, to first order: a penalty on input gradients (W-REBEL, WDPO).

For a type-2 Wasserstein ball of radius rho around the empirical distribution,
``sup_P E_P[l] = E[l] + rho·sqrt(E||grad_z l||^2) + o(rho)`` (Gao, Chen & Kleywegt). Token ids are
discrete, so ``z`` is the input embeddings (for a log-linear policy: the feature vectors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

SQRT_EPS = 1e-12  # keeps d sqrt(G)/dG finite when every input gradient vanishes


@contextmanager
def double_backprop_attention() -> Iterator[None]:
    """Run scaled-dot-product attention on its math backend inside this block.

    The fused SDPA kernels (flash, memory-efficient, CPU flash) have no double backward, which
    the penalty's ``create_graph=True`` needs; the math backend differentiates twice.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def grad_sq_norms(losses: Tensor, inputs: Sequence[Tensor], create_graph: bool = True) -> Tensor:
    """Per-sample squared input-gradient norms ``g_i = sum_t ||d l_i / d z_t||^2`` from one call.

    Sample i's loss depends only on its own rows of each input, so one ``autograd.grad`` of
    ``sum_i l_i`` returns every per-sample gradient at once (no per-sample loop). An input has
    ``n`` rows (one per sample) or ``k·n`` rows laid out as ``k`` stacked blocks of ``n``
    (e.g. ``[chosen; rejected]``); the blocks of a sample are summed. ``create_graph=True`` keeps
    the graph for the double backprop of the penalty.
    """
    n = losses.numel()
    grads = torch.autograd.grad(losses.sum(), list(inputs), create_graph=create_graph)
    total = losses.new_zeros(n)
    for grad in grads:
        rows = grad.pow(2).reshape(grad.shape[0], -1).sum(1)
        if rows.numel() % n:
            raise ValueError(f"an input has {rows.numel()} rows, not a multiple of the {n} samples")
        total = total + rows.view(-1, n).sum(0)
    return total
