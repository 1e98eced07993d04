"""One rank of a 2-rank gloo step on the tiny GPT-2, for every policy method (run by torchrun).

Each rank takes its contiguous block of one fixed global pair batch, runs the loop's own step code
(``PairBatch.losses``, ``methods.backward_robust`` with the global all-gather, ``sum_gradients``)
and rank 0 saves the gradients, which must equal the single-rank gradient of the whole batch.
"""

import sys

import torch
import torch.distributed as dist
from _lm_step import METHODS, global_batch, one_step

from bench.loops.distributed import shard, sum_gradients
from bench.loops.train import disable_dropout
from tasks.lexicon.presets import load_policy

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
micro_batch = int(sys.argv[2])
out = {}
for name in METHODS:
    policy, tok = load_policy("tiny", steps=60)
    disable_dropout(policy)
    batch = global_batch(tok)
    mine = torch.tensor(shard(list(range(batch.m)), rank, size))
    grads, value = one_step(policy, batch.select(mine), name, micro_batch)
    sum_gradients(policy)
    out[name] = {"grads": {k: p.grad.clone() for k, p in policy.named_parameters()}, "value": value}
if rank == 0:
    torch.save(out, sys.argv[1])
dist.destroy_process_group()
