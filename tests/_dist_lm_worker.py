"""One rank of a 2-rank gloo step on the tiny GPT-2, for every policy method (run by torchrun).

Each rank takes its contiguous block of one fixed global pair batch, runs the loop's own step code
(``PairBatch.losses``, ``methods.backward_robust`` with the global all-gather, ``sum_gradients``)
and rank 0 saves the gradients, which must equal the single-rank gradient of the whole batch.
With ``fsdp`` the policy is sharded as the loop shards it (``fully_shard_policy``, gradient
checkpointing on, a Wasserstein step ``gathered``) and the gradient shards are gathered to compare.
"""

import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from _lm_step import METHODS, global_batch, one_step

import methods
from bench.loops.distributed import fully_shard_policy, gathered, shard, sum_gradients
from bench.loops.train import disable_dropout, enable_checkpointing
from methods.wasserstein import double_backprop_attention
from tasks.lexicon.presets import load_policy

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
micro_batch, sharded = int(sys.argv[2]), sys.argv[3] == "fsdp"
out = {}
for name in METHODS:
    policy, tok = load_policy("tiny", steps=60)
    disable_dropout(policy)
    wasserstein = methods.get(name).aggregator.kind == "wasserstein"
    if sharded:
        enable_checkpointing(policy, double_backprop_attention if wasserstein else None)
        fully_shard_policy(policy)
    batch = global_batch(tok)
    mine = torch.tensor(shard(list(range(batch.m)), rank, size))
    with gathered(policy) if wasserstein else nullcontext():
        grads, value = one_step(policy, batch.select(mine), name, micro_batch)
    sum_gradients(policy)
    full = {k: p.grad.full_tensor() if sharded else p.grad.clone() for k, p in policy.named_parameters()}
    out[name] = {"grads": full, "value": value}
if rank == 0:
    torch.save(out, sys.argv[1])
dist.destroy_process_group()
