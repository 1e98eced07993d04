"""Global-batch statistics under torch.distributed: gather detached losses from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_detached(local: Tensor) -> tuple[Tensor, int]:
    """All-gather a detached 1-D tensor (ranks may hold different lengths).

    Returns the concatenation in rank order and the offset of this rank's block in it.
    """
    local = local.detach()
    rank, size = world()
    if size == 1:
        return local, 0
    n = torch.tensor([local.numel()], device=local.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    blocks = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(blocks, padded)
    full = torch.cat([b[:c] for b, c in zip(blocks, counts, strict=True)])
    return full, sum(counts[:rank])
