"""One cell on N ranks: process-group set-up, the data-parallel policy, sharding and gathering.

A cell with ``train.nproc=N`` runs as N processes (``torch.distributed.run`` locally, N SLURM tasks
of one job on a cluster), each with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in its environment. Every rank holds the whole policy (data parallel, weights broadcast
from rank 0 at the start); the prompts of an iteration and of an evaluation are split into
contiguous blocks in rank order, so gathering them restores the single-rank order. The robust
weights are computed over the global batch by the method library's all-gather, and each rank
backpropagates its share of the global objective; the local objectives *sum* to the global one,
so the gradients are summed across ranks, by one bucketed all-reduce after the step's backward
passes. (DDP's overlap of that all-reduce with the backward is not used: a step makes several
backward passes — micro-batches, the two-pass robust weights, the Wasserstein double backward —
and DDP would reduce each of them.)
"""

from __future__ import annotations

import datetime as dt
import os

import torch
import torch.distributed as dist

from methods.distributed import world

__all__ = [
    "broadcast_parameters",
    "gather_rows",
    "init_from_env",
    "is_main",
    "shard",
    "sum_gradients",
    "world",
]


def init_from_env(device_type: str) -> tuple[int, int]:
    """Join the process group the environment describes (nccl on CUDA, gloo on CPU); (rank, world)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(minutes=30))
        if device_type == "cuda":  # a SLURM task may see only its own GPU: LOCAL_RANK modulo the visible
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return world()


def is_main() -> bool:
    return world()[0] == 0


def shard(items: list, rank: int, size: int) -> list:
    """This rank's contiguous block of ``items`` (blocks differ in length by at most one)."""
    bounds = [len(items) * r // size for r in range(size + 1)]
    return items[bounds[rank] : bounds[rank + 1]]


def gather_rows(local: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    size = world()[1]
    if size == 1:
        return list(local)
    parts: list = [None] * size
    dist.all_gather_object(parts, list(local))
    return [row for part in parts for row in part]


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank (they load the same checkpoint; this makes it certain)."""
    if world()[1] > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def sum_gradients(model: torch.nn.Module) -> None:
    """All-reduce (sum) every parameter's gradient across ranks, one flat bucket per dtype."""
    if world()[1] == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # unused on this rank: contributes zero, and every rank sends the same sizes
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
