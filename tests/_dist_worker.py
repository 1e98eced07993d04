"""Run under torchrun with 2 ranks (gloo): each rank holds half the batch; rank 0 saves grads."""

import sys

import torch
import torch.distributed as dist
from _problem import N, full_batch_grads, make

import methods

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
out = {}
for name in methods.names():
    method = methods.get(name)
    model, data = make()
    half = torch.arange(N).chunk(size)[rank]
    grads, stats = full_batch_grads(method, model, data, half)
    for g in grads:
        dist.all_reduce(g)  # sum of per-rank shares = full-batch gradient
    out[name] = {"grads": grads, "value": stats.value}
if rank == 0:
    torch.save(out, sys.argv[1])
dist.destroy_process_group()
