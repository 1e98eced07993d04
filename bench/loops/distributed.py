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
import io
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MethodType

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from bench.core.lm import SHARDED_LOGPS, _token_logps
from methods.distributed import world

__all__ = [
    "broadcast_object",
    "broadcast_parameters",
    "fully_shard_policy",
    "gather_rows",
    "gathered",
    "init_from_env",
    "is_main",
    "is_sharded",
    "load_sharded",
    "padded_shard",
    "save_sharded",
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


def padded_shard(items: list, rank: int, size: int, pad: bool = True) -> tuple[list, int]:
    """This rank's block (``shard``) and its length; with ``pad``, the block padded by repeating
    its last item (the list's first for an empty block) to the longest block's length: every rank
    then makes the same number of model calls, which a sharded model's collective forwards need."""
    block = shard(items, rank, size)
    longest = -(-len(items) // size) if pad else len(block)
    filler = block[-1:] or items[:1]
    return block + filler * (longest - len(block)), len(block)


def gather_rows(local: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    size = world()[1]
    if size == 1:
        return list(local)
    parts: list = [None] * size
    dist.all_gather_object(parts, list(local))
    return [row for part in parts for row in part]


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object of this run's own making)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank (they load the same checkpoint; this makes it certain)."""
    if world()[1] > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def sum_gradients(model: torch.nn.Module) -> None:
    """All-reduce (sum) every parameter's gradient across ranks, one flat bucket per dtype (a
    sharded model's gradients were already reduce-scattered in its backward)."""
    if world()[1] == 1 or is_sharded(model):
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


def fully_shard_policy(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` over the ranks with FSDP2 (``fully_shard``), in place.

    Each decoder layer (the classes in the model's ``_no_split_modules``, as accelerate wraps them)
    is one group, gathered for its forward and backward and freed after; the root holds the rest
    (embeddings, final norm, head: a tied head stays one parameter). The root's forward hooks also
    wrap the loop's log-prob pass, which calls the body and the head directly, and ``generate``
    runs ``gathered`` (each layer gathered once, not once per decoded token). Gradients are
    *summed* over ranks, as ``sum_gradients`` does (the local objectives sum to the global one): a
    reduce-scatter in every backward, with divide factor 1 applied locally (a pre-multiplied sum is
    NCCL-only). Every forward is a collective, so generation runs every rank's decoding loop to
    the longest response (transformers' ``synced_gpus``).
    """
    layers = set(getattr(model, "_no_split_modules", None) or ())
    groups = [m for m in model.modules() if type(m).__name__ in layers]
    if not groups:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by"
        )
    for module in [*groups, model]:
        fully_shard(module, reshard_after_forward=True)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    setattr(model, SHARDED_LOGPS, MethodType(_token_logps, model))
    register_fsdp_forward_method(model, SHARDED_LOGPS)
    generate = model.generate

    def gathered_generate(*args, **kwargs):
        with gathered(model):
            return generate(*args, **kwargs)

    model.generate = gathered_generate
    model._is_fsdp_managed_module = True  # transformers' generate then sets synced_gpus
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """A sharded ``model``'s full parameters on every rank from entry to exit (ZeRO-2 within: the
    gradients are still reduce-scattered), freed after; a no-op for an unsharded one. Decoding
    needs it for speed; the Wasserstein penalty's double backward needs it to run at all (FSDP2
    frees a layer's gathered weights after the first backward, which the second one reads)."""
    if not is_sharded(model):
        yield
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)


SHARDS = "checkpoint-shards"  # a sharded cell's checkpoint: checkpoint.pt names its shard folder


def save_sharded(model: torch.nn.Module, opt: torch.optim.Optimizer, run_dir: Path, iteration: int) -> str:
    """Every rank writes its shards of the model and optimizer state (torch.distributed.checkpoint)
    to a folder of this iteration's own; the folder's name, for ``checkpoint.pt`` to point to once
    all ranks are done. A kill mid-save leaves the previous checkpoint whole."""
    name = f"{SHARDS}-{iteration}"
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=Path(run_dir) / name)
    dist.barrier()
    return name


def remove_shards(run_dir: Path, keep: str | None = None) -> None:
    """The shard folders in ``run_dir`` but ``keep`` (the one ``checkpoint.pt`` names)."""
    for folder in Path(run_dir).glob(f"{SHARDS}-*"):
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)


def load_sharded(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Read back ``save_sharded``'s folder into a model sharded over as many ranks."""
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=WeightsOnlyLoadPlanner())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class SafeFileSystemReader(dcp.FileSystemReader):
    """torch.distributed.checkpoint's reader with its metadata file read by an unpickler that
    builds only the checkpoint's own metadata classes (``MetadataUnpickler``) instead of
    ``pickle.load``: a metadata file holding code is refused, never run, as ``checkpoint.pt`` is."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """The default planner, but the checkpoint's non-tensor items (the optimizer's hyperparameters)
    are read by the weights-only unpickler first: torch's planner reads them with a full
    ``torch.load``. What passes is plain data, handed on re-serialized."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain, buffer = torch.load(value, weights_only=True), io.BytesIO()
        torch.save(plain, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


# What a torch.distributed.checkpoint metadata pickle may build: the classes the metadata module
# defines, and the few torch and pathlib names they hold (those torch 2.13 writes); exact names only
# (a dotted one such as ``os.system`` would reach through the module's own imports).
METADATA_GLOBALS = {
    *(
        (dcp_metadata.__name__, name)
        for name, value in vars(dcp_metadata).items()
        if isinstance(value, type) and value.__module__ == dcp_metadata.__name__
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not torch.distributed.checkpoint metadata")


def readable_shards(run_dir: Path, name: object) -> bool:
    """Whether ``name`` (from ``checkpoint.pt``) is one of ``save_sharded``'s folders in ``run_dir``
    with metadata the safe reader accepts (checked on rank 0 before any rank loads it)."""
    if not isinstance(name, str) or not re.fullmatch(rf"{SHARDS}-\d+", name):
        return False
    try:
        SafeFileSystemReader(Path(run_dir) / name).read_metadata()
    except Exception:  # missing, truncated or refused
        return False
    return True
