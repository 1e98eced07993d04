"""Memory and time of a cell, known before it is submitted (``bench plan``, and ``bench run``'s check).

Sizes are in GiB (2^30 bytes); a GPU's memory is its datasheet figure read as GiB.

Every model a cell holds comes from its task (``TaskSpec.models``: published configs, nothing
downloaded) and is built on the meta device to count its parameters. On a GPU (bytes):

* policy, trained with fp32 master weights under bf16 autocast: 4P weights + 4P gradients +
  8P AdamW moments (SGD: 8P in all), plus a transient 2P of bf16 weight copies while autocast runs;
* the frozen reference and reward models in bf16: 2P each;
* training activations of one micro-batch of ``r`` sequences of ``T`` tokens: ``34·h·L`` bytes per
  token without gradient checkpointing (Korthikanti et al. 2022, bf16, SDPA attention with no T²
  score matrix), ``2·h·L + 34·h`` with it; the logits ``12·V`` bytes per token (bf16 logits, their
  fp32 copy and its gradient); Wasserstein methods keep the graph of the first backward (x2);
* generation: the KV cache ``2·L·d_kv·2`` bytes per token (bf16) for the rows of the largest
  ``generate`` call (the rollouts', the evaluation's with ``eval.samples`` a prompt, or the head
  scaler's), and per-step fp32 logits of those rows;
* 1 GiB of CUDA context and 10% allocator slack on the peak;
* a cell of N ranks is sized per rank: each trains on, samples and evaluates its 1/N of the
  prompts (the communication between ranks is not modelled);
* sharded over N ranks (``train.shard=fsdp``, or ``auto`` where the replicated cell does not
  fit): the policy's state and the reference divided by N, the reward models whole, plus the
  gathered fp32 policy (4P) while generating and through a Wasserstein step, else two layers.

Time per iteration is a roofline: training and scoring FLOPs (6P per trained token, 2P per
scored or reference token, +2P with checkpointing) at 40% of the GPU's dense bf16 peak, decoding
at the larger of weight and KV-cache reads at 60% of its memory bandwidth and a kernel-launch floor
of 0.15 ms per layer and step; evaluation amortized over ``train.eval_every``. These are estimates
to choose resources by; every run record holds the measured peak memory and s/iteration beside them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

import methods
import tasks
from bench.harness.runner import Cell
from bench.loops.callbacks import CHECKPOINT
from bench.loops.config import ConfigError
from bench.loops.distributed import SHARDS

GIB = 2**30
CONTEXT_BYTES = GIB
SLACK = 1.10
MFU = 0.40
BANDWIDTH_EFFICIENCY = 0.60
LAUNCH_S_PER_LAYER = 0.15e-3
ASSUMED_PROMPT_TOKENS = 128  # where a task does not bound its prompts


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bf16_flops: float  # dense peak, datasheet
    bandwidth: float  # bytes/s, datasheet


GPUS = {
    "H100": GPU("H100-80GB", 80, 989e12, 3.35e12),
    "H200": GPU("H200-141GB", 141, 989e12, 4.8e12),
    "A100": GPU("A100-80GB", 80, 312e12, 2.04e12),
    "A100-40": GPU("A100-40GB", 40, 312e12, 1.56e12),
    "L40S": GPU("L40S-48GB", 48, 362e12, 0.864e12),
}


def gpu_named(name: str, memory_gb: float | None = None) -> GPU:
    """A GPU of the table by name (``H100``, ``A100-40``, ...), its memory overridable."""
    key = next((k for k in sorted(GPUS, key=len, reverse=True) if k.lower() in name.lower()), None)
    if key is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    gpu = GPUS[key]
    return GPU(gpu.name, memory_gb or gpu.memory_gb, gpu.bf16_flops, gpu.bandwidth)


def local_gpu() -> GPU | None:
    """The first visible CUDA device, with its real memory (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    try:
        base = gpu_named(props.name)
    except ValueError:
        base = GPUS["H100"]
    return GPU(props.name, props.total_memory / GIB, base.bf16_flops, base.bandwidth)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: parameters, layers, width, vocabulary, KV width."""

    params: int
    layers: int
    hidden: int
    vocab: int
    kv_dim: int


@cache
def _shape(config_items: tuple, causal_lm: bool) -> Shape:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    raw = dict(config_items)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    loader = AutoModelForCausalLM if causal_lm else AutoModel
    with torch.device("meta"):
        model = loader.from_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        kv_dim=kv_heads * head_dim,
    )


def model_shape(spec: tasks.ModelSpec) -> Shape:
    """The shape of one of a task's models, built on the meta device (no weights, no download)."""
    items = tuple(sorted((k, v) for k, v in spec.config.items() if not isinstance(v, (dict, list))))
    return _shape(items, spec.role != "reward")


@dataclass
class Estimate:
    cell: Cell
    device: str  # "gpu" or "cpu"
    models: dict[str, int]  # role -> parameters
    static_gb: float  # weights, gradients, optimizer state, frozen models
    train_gb: float  # activations and logits of one micro-batch
    generate_gb: float  # KV cache and logits of one generate call
    peak_gb: float
    s_per_iteration: float | None
    gpu: GPU | None = None
    sharded: bool = False  # FSDP over train.nproc ranks (figures per rank)

    @property
    def fits(self) -> bool:
        return self.gpu is None or self.peak_gb <= self.gpu.memory_gb

    def advice(self) -> str:
        """What to change when the cell does not fit (empty when it fits)."""
        if self.fits:
            return ""
        cfg = self.cell.config()
        room = self.gpu.memory_gb - self.static_gb * SLACK - CONTEXT_BYTES / GIB
        if room <= 0:
            need = math.ceil(self.static_gb * SLACK + CONTEXT_BYTES / GIB)
            bigger = [g.name for g in GPUS.values() if g.memory_gb >= need]
            fit = self._sharded_fit(cfg)
            shard = f"shard it over the GPUs of a node ({' '.join(fit)}), " if fit else ""
            return (
                f"the weights, gradients and optimizer state alone need {need} GB: {shard}ask for a GPU "
                f"with more memory ({', '.join(bigger) or 'none in the table'}; slurm.gpu_mem_gb=...) "
                "or a smaller model"
            )
        lightest = None
        for overrides in self._lighter(cfg):
            lighter = Cell(
                self.cell.task, self.cell.method, self.cell.seed, (*self.cell.overrides, *overrides)
            )
            lightest = estimate(lighter, self.gpu)
            if lightest.fits:
                return "try " + " ".join(overrides)
        need = lightest.peak_gb if lightest else self.peak_gb
        bigger = [g.name for g in GPUS.values() if g.memory_gb >= need]
        return (
            f"even with checkpointing and one pair per micro-batch it needs ~{need:.0f} GiB: ask for a GPU "
            f"with more memory ({', '.join(bigger) or 'none in the table'}; slurm.gpu_mem_gb=...), "
            "shorter responses (task.max_new_tokens) or a smaller model"
        )

    def _sharded_fit(self, cfg) -> tuple[str, ...] | None:
        """The fewest ranks (2, 4, 8 GPUs of a node) over which the cell, sharded with FSDP and
        if need be checkpointed in smaller micro-batches, fits; None if none does."""
        if cfg.train.shard.value == "fsdp":
            return None
        pairs = cfg.train.micro_batch or cfg.train.batch_size
        ckpt = ("train.grad_checkpointing=true",)
        lighter = [(), ckpt, *((*ckpt, f"train.micro_batch={k}") for k in (16, 8, 4, 2, 1) if k < pairs)]
        for n in (cfg.train.nproc,) if cfg.train.nproc > 1 else (2, 4, 8):
            for extra in lighter if cfg.train.batch_size % n == 0 else ():
                overrides = (*self.cell.overrides, f"train.nproc={n}", "train.shard=fsdp", *extra)
                if estimate(Cell(self.cell.task, self.cell.method, self.cell.seed, overrides), self.gpu).fits:
                    return (f"train.nproc={n}", "train.shard=fsdp", *extra)
        return None

    @staticmethod
    def _lighter(cfg) -> list[tuple[str, ...]]:
        """Candidate overrides, lightest change first: checkpointing alone, then with ever
        smaller micro-batches."""
        local = cfg.train.batch_size // cfg.train.nproc
        pairs = min(cfg.train.micro_batch or local, local)
        ckpt = ("train.grad_checkpointing=true",)
        out = [ckpt] if not cfg.train.grad_checkpointing else []
        return out + [(*ckpt, f"train.micro_batch={k}") for k in range(pairs - 1, 0, -1)]


def estimate(cell: Cell, gpu: GPU | None) -> Estimate:
    """The memory (GB) and time per iteration of ``cell`` on ``gpu`` (None: no verdict)."""
    cfg = cell.config()
    spec = tasks.get(cell.task)
    tc, task_cfg = cfg.train, cfg.task
    shapes = [(m.role, model_shape(m)) for m in spec.model_specs(cfg.task)]
    if not shapes:  # a task without language models (the linear task): nothing to size
        return Estimate(cell, "cpu", {}, 0.0, 0.0, 0.0, 0.0, None)
    policy = next(s for role, s in shapes if role == "policy")
    frozen = [s for role, s in shapes if role != "policy"]
    on_gpu = spec.gpus > 0 and gpu is not None
    frozen_bytes = 2 if on_gpu else 4
    state_bytes = 16 if tc.optimizer.value == "adamw" else 8
    static = state_bytes * policy.params + frozen_bytes * sum(s.params for s in frozen)

    prompt = int(task_cfg.get("max_prompt_tokens", 0) or ASSUMED_PROMPT_TOKENS)
    new = int(task_cfg.get("max_new_tokens", 32))
    seq = prompt + new
    if task_cfg.get("max_total_tokens", 0):  # prompt and response share one budget (Emotion)
        seq = min(seq, int(task_cfg.max_total_tokens))
    local = tc.batch_size // tc.nproc  # each rank's block of the prompts (build_config: it divides)
    pairs = min(tc.micro_batch or local, local)
    rows = 2 * pairs
    per_token = (
        (2 * policy.hidden * policy.layers + 34 * policy.hidden)
        if tc.grad_checkpointing
        else 34 * policy.hidden * policy.layers
    )
    per_token += 12 * policy.vocab
    double = methods.get(cell.method).aggregator.kind == "wasserstein"
    train_act = rows * seq * per_token * (2 if double else 1) + 2 * policy.params
    # the largest generate call (lm.Sampling.batch_size prompts, k samples each): the rollouts (2 a
    # prompt), the evaluation (eval.samples a prompt, over this rank's test block) or the head
    # scaler's 64 reference prompts (2 each)
    per_call = int(task_cfg.get("generate_batch", 64))
    test_block = math.ceil(int(task_cfg.get("n_test", 0)) / tc.nproc)
    rollout_rows = 2 * min(per_call, local)
    gen_rows = max(rollout_rows, cfg.eval.samples * min(per_call, test_block), 2 * min(per_call, 64))
    kv_per_row = seq * policy.layers * 2 * policy.kv_dim * 2
    gen = gen_rows * (kv_per_row + policy.vocab * 4 * 3)
    peak = (static + max(train_act, gen)) * SLACK + CONTEXT_BYTES
    ranks, shard = tc.nproc, tc.shard.value
    too_big = on_gpu and peak > gpu.memory_gb * GIB
    # auto never shards a cell that scores with lm-eval at its end (an unsharded policy)
    sharded = ranks > 1 and (shard == "fsdp" or (shard == "auto" and too_big and not tc.lmeval_tasks))
    if sharded:  # FSDP: the policy's state and the reference split over the ranks, the rest whole
        reference = sum(s.params for role, s in shapes if role == "reference")
        static = (state_bytes * policy.params + frozen_bytes * reference) / ranks + frozen_bytes * (
            sum(s.params for s in frozen) - reference
        )
        whole = 4 * policy.params  # the gathered fp32 policy: while generating, through a W step
        train_act += whole if double else 2 * whole / policy.layers  # else two layers at a time
        gen += whole
        peak = (static + max(train_act, gen)) * SLACK + CONTEXT_BYTES

    seconds = None
    if on_gpu:
        flops = MFU * gpu.bf16_flops
        train_tokens = local * 2 * seq
        pol_flops = (6 + (2 if tc.grad_checkpointing else 0)) * policy.params * train_tokens
        pol_flops *= 1.7 if double else 1.0
        frozen_flops = 2 * sum(s.params for s in frozen) * train_tokens
        calls = math.ceil(local / 64)
        step_read = (2 * policy.params + rollout_rows * kv_per_row) / (BANDWIDTH_EFFICIENCY * gpu.bandwidth)
        decode = calls * new * max(step_read, LAUNCH_S_PER_LAYER * policy.layers)
        n_eval = math.ceil((int(task_cfg.get("n_test", 0)) + int(task_cfg.get("n_val", 0))) / tc.nproc)
        eval_s = math.ceil(n_eval / 64) * new * max(step_read, LAUNCH_S_PER_LAYER * policy.layers)
        eval_s += 2 * (policy.params + sum(s.params for s in frozen)) * n_eval * seq / flops
        seconds = (pol_flops + frozen_flops) / flops + decode + eval_s / tc.eval_every

    return Estimate(
        cell=cell,
        device="gpu" if spec.gpus > 0 else "cpu",
        models={role: s.params for role, s in shapes},
        static_gb=static / GIB,
        train_gb=train_act / GIB,
        generate_gb=gen / GIB,
        peak_gb=peak / GIB,
        s_per_iteration=seconds,
        gpu=gpu if on_gpu else None,
        sharded=sharded,
    )


def resolve_shard(cell: Cell, gpu: GPU | None) -> str:
    """What ``train.shard`` means for ``cell`` on ``gpu``: ``auto`` is fsdp for a multi-rank cell
    whose replicated estimate does not fit the GPU, replicate otherwise (and on CPU)."""
    return "fsdp" if estimate(cell, gpu).sharded else "replicate"


def with_resolved_shard(cell: Cell, root: str | Path) -> Cell:
    """``cell`` with ``train.shard=auto`` resolved for this node's GPU (``local_gpu``): a job does
    it where it runs, and its ranks receive the answer (``Cell.shard``). A cell that resumes keeps
    what its checkpoint was written with (a requeued job may land on another kind of GPU)."""
    tc = cell.config().train
    if tc.nproc == 1 or tc.shard.value != "auto":
        return cell
    run_dir = cell.run_dir(root)
    if (run_dir / CHECKPOINT).exists():
        shard = "fsdp" if any(run_dir.glob(f"{SHARDS}-*")) else "replicate"
    else:
        shard = resolve_shard(cell, local_gpu())
    return dataclasses.replace(cell, shard=shard)


def _count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def plan_table(estimates: list[Estimate]) -> list[list]:
    """Rows of ``bench plan``: one per cell."""
    rows = []
    for e in estimates:
        verdict = "cpu" if e.device == "cpu" else ("fits" if e.fits else "DOES NOT FIT")
        verdict += " (fsdp: GiB per rank)" if e.sharded else ""
        if e.device == "gpu" and e.gpu is None:
            verdict = "no GPU here (runs on CPU)"
        rows.append(
            [
                e.cell.label(),
                " + ".join(f"{r} {_count(p)}" for r, p in e.models.items()) or "-",
                f"{e.static_gb:.1f}",
                f"{e.train_gb:.1f}",
                f"{e.generate_gb:.1f}",
                f"{e.peak_gb:.1f}",
                f"{e.gpu.memory_gb:.0f} ({e.gpu.name})" if e.gpu else "-",
                f"{e.s_per_iteration:.2f}" if e.s_per_iteration is not None else "-",
                verdict + (f": {e.advice()}" if not e.fits else ""),
            ]
        )
    return rows


PLAN_HEADERS = [
    "cell",
    "models",
    "static GiB",
    "train GiB",
    "generate GiB",
    "peak GiB",
    "GPU GiB",
    "s/iter",
    "verdict",
]


HOST_BASE_GB = 8  # Python, torch, the tokenizers and datasets of a cell
MIN_TIME_MIN, MAX_TIME_MIN = 30, 24 * 60  # cells checkpoint and requeue, so a day bounds a job


def host_memory_gb(e: Estimate) -> float:
    """Host memory of a GPU cell: the policy is loaded in fp32 and the largest frozen model in its
    dtype on the host before they move to the GPU."""
    cfg = e.cell.config()
    shapes = [model_shape(m) for m in tasks.get(e.cell.task).model_specs(cfg.task)]
    policy = shapes[0].params
    frozen = max((s.params for s in shapes[1:]), default=0)
    return (4 * policy + 2 * frozen) / GIB + HOST_BASE_GB


def slurm_gpu(slurm) -> GPU:
    """The GPU a SLURM job gets: ``slurm.gpu_mem_gb`` of memory, timed as an H100."""
    h100 = GPUS["H100"]
    return GPU(f"slurm.gpu_mem_gb={slurm.gpu_mem_gb:g}", slurm.gpu_mem_gb, h100.bf16_flops, h100.bandwidth)


def sized_resources(cells: list[Cell], slurm):
    """A copy of the SLURM config with the resources left at None sized from the cells' tasks (the
    largest cell of the array decides; the user's values always win)."""
    gpu = GPU(
        f"{slurm.gpu_mem_gb:g} GB GPU", slurm.gpu_mem_gb, GPUS["H100"].bf16_flops, GPUS["H100"].bandwidth
    )
    need_gpu = any(tasks.get(c.task).gpus > 0 for c in cells)
    nproc = max(c.config().train.nproc for c in cells)  # one SLURM task per rank
    sized = {"gpus_per_task": 0, "cpus_per_task": 1, "mem_gb": 4.0, "time_min": 60, "tasks_per_node": nproc}
    if need_gpu:
        estimates = [estimate(c, gpu) for c in cells if tasks.get(c.task).gpus > 0]
        minutes = max(
            2 * e.cell.config().train.iterations * (e.s_per_iteration or 0) / 60 + 15 for e in estimates
        )
        sized = {
            "gpus_per_task": max(tasks.get(c.task).gpus for c in cells),
            "cpus_per_task": 8,
            "mem_gb": float(math.ceil(max(host_memory_gb(e) for e in estimates))),
            "time_min": int(min(MAX_TIME_MIN, max(MIN_TIME_MIN, math.ceil(minutes)))),
            "tasks_per_node": nproc,
        }
    else:
        sized["cpus_per_task"] = max(max(1, c.config().train.threads) for c in cells)
    return dataclasses.replace(slurm, **{k: v for k, v in sized.items() if getattr(slurm, k) is None})


def refuse_what_cannot_fit(cells: list[Cell], gpu: GPU | None) -> None:
    """Raise before anything is submitted when a GPU cell's estimate exceeds ``gpu``'s memory."""
    if gpu is None:
        return
    bad = [e for e in (estimate(c, gpu) for c in cells if tasks.get(c.task).gpus > 0) if not e.fits]
    if bad:
        lines = [f"  {e.cell.label()}: ~{e.peak_gb:.0f} GB; {e.advice()}" for e in bad[:10]]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ConfigError(
            f"{len(bad)} cells would not fit in the {gpu.memory_gb:.0f} GB of a {gpu.name} "
            "(see `bench plan`); nothing was submitted:\n" + "\n".join(lines) + more
        )
