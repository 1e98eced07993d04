"""Online preference alignment of a causal language model with any registered method.

Per iteration t:
  1. draw m prompts from the training pool (seeded passes without replacement; the cursor is state);
  2. sample two responses per prompt from the current policy (batched, KV cache);
  3. score the task's K reward heads, standardized with statistics frozen from the reference;
  4. mix them into the training reward (fixed alpha0 or a random seen pair per prompt) and, for the
     DPO family, draw preference labels (Bradley-Terry sample, soft, or argmax);
  5. anchor log-probs under the fixed reference or the sampling iterate (``method.anchor``);
  6. one forward per pair chunk, first and second responses concatenated, log-probs only at
     response tokens; the method's pointwise losses and robust objective; backward (accumulated
     over micro-batches with global-batch weights); one optimizer step.
``train.data=offline`` instead draws pairs from a fixed set sampled once from the reference policy
and labeled by the training mixture (the WDPO paper's protocol). Every ``checkpoint_every``
iterations the model, optimizer, scheduler, every RNG state and the sampler cursor are saved, so a
killed run resumes and ends with exactly the metrics of an uninterrupted one. Checkpoints are read
by the weights-only unpickler (a file holding code is refused and moved aside, never run), and the
runner removes the checkpoint only after the record is written.
"""

from __future__ import annotations

import copy
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import methods
from bench.core.artifacts import load_or_set_aside, load_tensors, save_tensors, set_aside
from bench.core.generation import check_generator, make_generator
from bench.core.lm import SequenceBatch, chunked_logps, sample, sequence_batch, sequence_logps
from bench.core.refcache import cached, code_fingerprint, model_fingerprint
from bench.core.resources import peak_memory_mb, utilisation
from bench.loops.callbacks import CHECKPOINT, Interrupted, OnEval, stop_requested
from bench.loops.capability import require_task_modules
from bench.loops.config import loss_kwargs, method_radius, to_dict
from bench.loops.distributed import (
    broadcast_object,
    broadcast_parameters,
    fully_shard_policy,
    gather_rows,
    gathered,
    init_from_env,
    is_sharded,
    load_sharded,
    readable_shards,
    remove_shards,
    save_sharded,
    shard,
    sum_gradients,
)
from bench.loops.evaluate import HeadScaler, evaluate_lm, seeded_rng
from bench.loops.monitor import Monitor
from methods import GroupOptions, Method, PairScores
from methods.pointwise import preference_labels
from methods.wasserstein import double_backprop_attention
from tasks.mixtures import mix_rewards


@dataclass
class PromptSampler:
    """Seeded passes over ``n`` items without replacement; ``(epoch, cursor)`` is its whole state."""

    n: int
    seed: int
    epoch: int = 0
    cursor: int = 0

    def take(self, m: int) -> list[int]:
        out: list[int] = []
        while len(out) < m:
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            )
            chunk = order[self.cursor : self.cursor + m - len(out)].tolist()
            out += chunk
            self.cursor += len(chunk)
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out


@dataclass
class PairBatch:
    """One iteration's pairs, sequences laid out as ``[first responses; second responses]``."""

    seqs: SequenceBatch
    rewards: Tensor  # [m, 2]
    pref: Tensor  # [m]
    groups: Tensor  # [m]
    anchor: Tensor | None = None  # [m, 2]

    @property
    def m(self) -> int:
        return self.rewards.shape[0]

    def select(self, sel: Tensor) -> PairBatch:
        """The pairs ``sel`` as a batch of their own (a rank's block of the global batch)."""
        anchor = None if self.anchor is None else self.anchor[sel]
        return PairBatch(self.rows(sel), self.rewards[sel], self.pref[sel], self.groups[sel], anchor)

    def rows(self, sel: Tensor) -> SequenceBatch:
        both = torch.cat([sel, sel + self.m])
        seqs = self.seqs
        width = int(seqs.attention_mask[both].sum(1).max())
        return SequenceBatch(
            seqs.input_ids[both, :width],
            seqs.attention_mask[both, :width],
            seqs.target_mask[both, : width - 1],
        )

    def losses(self, policy, method: Method, hparams: dict, temperature: float, sel: Tensor):
        """Per-pair losses of rows ``sel`` and the input embeddings the W penalty perturbs."""
        seqs = self.rows(sel)
        if method.aggregator.kind == "wasserstein":
            inputs: list[Tensor] = []
            with double_backprop_attention():
                logps = sequence_logps(policy, seqs, temperature, embeds=inputs)
        else:
            logps, inputs = sequence_logps(policy, seqs, temperature), []
        pair = logps.view(2, -1).T
        # No anchor: the previous iterate, which is the current weights during this step's gradient.
        anchor = pair.detach() if self.anchor is None else self.anchor[sel]
        scores = PairScores(pair, anchor, self.rewards[sel], self.pref[sel])
        return methods.pointwise_losses(method, scores, **hparams), inputs


def sample_pairs(
    policy,
    tok,
    task,
    prompts: list,
    scaler: HeadScaler,
    gen: torch.Generator,
    cfg: DictConfig,
    generator=None,
):
    """Two responses per prompt from ``policy`` (through ``generator`` when given: the training
    rollouts' backend), scored, mixed and labeled: a ``PairBatch``."""
    texts = [p.text for p in prompts]
    if generator is None:
        samples = sample(policy, tok, texts, 2, task.sampling)
    else:
        samples = generator.sample(texts, 2, task.sampling)
    m = len(prompts)
    heads = scaler(task.score([p.text for p in prompts for _ in (0, 1)], samples.texts)).view(m, 2, -1)
    weights, pair_ids = task.protocol.sample_train(m, gen)
    rewards = mix_rewards(heads, weights[:, None, :], task.protocol.train.kind)
    pref = preference_labels(rewards, cfg.method.labels.value, gen)
    groups = pair_ids if pair_ids is not None else torch.tensor([p.group for p in prompts])
    first, second = samples.response_ids[0::2], samples.response_ids[1::2]
    seqs = sequence_batch(samples.prompt_ids * 2, first + second, tok.pad_token_id)
    return PairBatch(seqs, rewards.float(), pref.float(), groups), samples


# The plain-data classes a checkpoint or a reference-cache entry may hold (offline pairs); the
# weights-only unpickler accepts these and refuses every other class.
PAIR_TYPES = (PairBatch, SequenceBatch)


def group_options(task, cfg: DictConfig) -> GroupOptions:
    """The groups GR-DPO / GR-IPO weigh: the ordered objective pairs of a random-pairs protocol
    (ArmoRM; drawn uniformly, so equal shares) or the training prompts' groups with their counts."""
    if task.protocol.random_pairs:
        shares = torch.ones(len(task.protocol.pairs()), dtype=torch.float64)
    else:
        shares = torch.bincount(torch.tensor([p.group for p in task.prompts("train")])).double()
    return GroupOptions(shares.numel(), cfg.method.group_update, shares)


def offline_pairs(
    reference, tok, task, prompts: list, scaler, cfg: DictConfig, chunk: int, cache: bool = True
) -> PairBatch:
    """The offline pair set with its reference log-probs, shared through the reference cache by
    every method and radius that trains on the same data (same task config, seed and labels).
    It is drawn from its own seeded streams, so a cache hit leaves the run's randomness unchanged.
    ``cache=False`` builds it here (a sharded reference: every rank must take part)."""
    spec = {
        "task": to_dict(cfg)["task"],
        "seed": cfg.seed,
        "labels": cfg.method.labels.value,
        "scaler": scaler.state(),
        "logp_temperature": cfg.method.logp_temperature,
        "reward_weights": getattr(task, "reward_fingerprint", ""),
        "kind": "offline-pairs",
    }

    def build() -> PairBatch:
        with seeded_rng(cfg.seed * 7_368_787 + 1, reference):
            batch, _ = sample_pairs(
                reference, tok, task, prompts, scaler, torch.Generator().manual_seed(cfg.seed + 1), cfg
            )
        anchor = chunked_logps(reference, batch.seqs, cfg.method.logp_temperature, chunk)
        batch.anchor = anchor.view(2, -1).T.cpu()  # the pair set is kept on the host, as its sequences
        return batch

    return cached(spec, model_fingerprint(reference), build, allowed=PAIR_TYPES) if cache else build()


def rng_state() -> dict:
    """Python's, NumPy's (its key as a tensor, so a weights-only load reads it) and torch's streams."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def disable_dropout(model: torch.nn.Module) -> None:
    """Deterministic log-probs: the policy and its reference are compared token by token."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class EnterEachTime:
    """A context made afresh from ``factory`` at every entry: a double backward recomputes a
    checkpointed layer twice, and a generator-based context can be entered only once."""

    def __init__(self, factory: Callable[[], AbstractContextManager]):
        self.factory, self.open = factory, []

    def __enter__(self) -> None:
        self.open.append(self.factory())
        self.open[-1].__enter__()

    def __exit__(self, *exc) -> bool | None:
        return self.open.pop().__exit__(*exc)


def enable_checkpointing(model, attention: Callable[[], AbstractContextManager] | None = None) -> None:
    """Recompute each layer in the backward (non-reentrant, so a double backward works). A method
    that runs its forward under an ``attention`` backend context (the Wasserstein penalty's math
    SDPA) needs the recompute under the same one, or the saved tensors differ in shape."""
    kwargs: dict = {"use_reentrant": False}
    if attention is not None:
        kwargs["context_fn"] = lambda: (EnterEachTime(attention), EnterEachTime(attention))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def uses_bf16(device: torch.device, name: str) -> bool:
    """bf16 where asked for (``auto``: on CUDA devices that support it)."""
    return name == "bf16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


@contextmanager
def precision(device: torch.device, name: str) -> Iterator[None]:
    """bf16 autocast where ``uses_bf16``: the policy keeps fp32 master weights (its AdamW updates,
    about lr/|w| = 1e-5/0.02, are far below bf16's resolution of 2^-8), matmuls run in bf16."""
    with torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, name) else nullcontext():
        yield


def start_spec(cfg: DictConfig, task, device: torch.device) -> dict:
    """The reference-cache key of a cell's head scaler and iteration-0 evaluation: all that can
    change them and nothing a method or radius sets. The task section and its config class, the
    evaluation section, the seed, the resolved device and precision, torch's thread count (float
    sums depend on it), gradient checkpointing (set on the policy before the evaluation), a
    fingerprint of the code and one of a learned reward model's weights. Not the rollout backend
    (``train.generator``, built after the evaluation, which samples through ``bench.core.lm``) nor
    the training batch sizes."""
    full, task_cls = to_dict(cfg), OmegaConf.get_type(cfg.task)
    return {
        "kind": "start-scores",
        "task": full["task"],
        "task_config": f"{task_cls.__module__}.{task_cls.__qualname__}",
        "eval": full["eval"],
        "seed": cfg.seed,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "bf16": uses_bf16(device, cfg.train.precision),
        "threads": torch.get_num_threads(),
        "grad_checkpointing": cfg.train.grad_checkpointing,
        "code": code_fingerprint(),
        # a task scoring with weights its config names by path only (a learned reward model)
        "reward_weights": getattr(task, "reward_fingerprint", ""),
    }


def start_scores(
    policy, reference, tok, task, cfg: DictConfig, evaluate: Callable, device: torch.device, size: int
) -> tuple[HeadScaler, dict, list[dict]]:
    """The head scaler (statistics of reference samples) and the iteration-0 evaluation (the policy
    is the reference then) with its shown samples, shared through the reference cache by every
    method and radius of a task config, evaluation and seed. Both draw from their own seeded
    streams, so a cache hit leaves the run's randomness unchanged. A multi-rank cell computes them
    without the cache: every rank takes part in the evaluation's gathers."""

    def build() -> dict:
        scaler = HeadScaler()
        if task.standardize:
            with precision(device, cfg.train.precision):
                scaler = HeadScaler.from_reference(reference, tok, task, cfg.seed)
        row, shown = evaluate(policy, scaler=scaler, iteration=0)
        return {"scaler": scaler.state(), "reference": row, "samples_before": shown}

    start = build() if size > 1 else cached(start_spec(cfg, task, device), model_fingerprint(policy), build)
    return HeadScaler(**start["scaler"]), start["reference"], start["samples_before"]


def train(
    cfg: DictConfig, task, run_dir: Path, on_eval: OnEval | None = None, monitor: Monitor | None = None
) -> dict:
    """Train and evaluate one cell, resuming from ``run_dir/checkpoint.pt`` if one exists; live
    metrics go to ``monitor`` (by default ``metrics.jsonl`` in ``run_dir`` only)."""
    method = methods.get(cfg.method.name)
    radius, hparams = method_radius(cfg), loss_kwargs(cfg)
    tc = cfg.train
    check_generator(tc.generator)  # an unknown backend or an absent vLLM: one line, before anything loads
    require_task_modules(list(tc.lmeval_tasks))  # lm-eval tasks' packages, before training, not after
    device = resolve_device(tc.device)
    ctx = partial(precision, device, tc.precision)  # generation, scoring and training alike
    temperature = cfg.method.logp_temperature  # the loss family's convention (build_config)
    groups = group_options(task, cfg)
    chunk = tc.micro_batch or 2 * tc.batch_size
    # The policy (and any preset it needs built) before the process group: transformers saves a
    # model only on rank 0 once torch.distributed is initialized.
    policy, tok = task.load_policy()
    rank, size = init_from_env(device.type)  # (0, 1) unless launched as train.nproc ranks
    sharded = size > 1 and tc.shard.value == "fsdp"  # auto was resolved by the job (Cell.shard)
    monitor = monitor or Monitor(run_dir)
    monitor.rank = rank  # only rank 0 writes and logs
    if device.type == "cuda" and size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if size > 1 and rank > 0:  # each rank samples its own responses; rank 0 keeps the seed's streams
        torch.manual_seed(cfg.seed * 1_000_003 + rank)
    disable_dropout(policy)
    policy.to(device)
    broadcast_parameters(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if uses_bf16(device, tc.precision) and device.type == "cuda":
        reference.to(torch.bfloat16)  # frozen: half the memory, and autocast computes in bf16 anyway
    wasserstein = method.aggregator.kind == "wasserstein"
    if tc.grad_checkpointing:
        enable_checkpointing(policy, double_backprop_attention if wasserstein else None)
    if sharded:  # the frozen reference is sharded likewise; the task's reward models stay whole
        fully_shard_policy(policy)
        fully_shard_policy(reference)
    opt_cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[tc.optimizer.value]
    opt = opt_cls(policy.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, tc.warmup)))
    gen = torch.Generator().manual_seed(cfg.seed if rank == 0 else cfg.seed * 1_000_003 + rank)
    train_prompts = task.prompts("train")

    def evaluate(model, **kwargs):
        with ctx():
            return evaluate_lm(
                model,
                task=task,
                tok=tok,
                reference=reference,
                seed=cfg.seed,
                samples=cfg.eval.samples,
                **kwargs,
            )

    ckpt = Path(run_dir) / CHECKPOINT
    ckpt.parent.mkdir(parents=True, exist_ok=True)

    st = load_or_set_aside(ckpt, "checkpoint", PAIR_TYPES, device) if rank == 0 else None
    if st is not None and st.get("shards") and not readable_shards(ckpt.parent, st["shards"]):
        set_aside(ckpt, "checkpoint", f"its shard folder {st['shards']!r} is missing or unreadable")
        st = None
    if size > 1:  # rank 0 decides (a bad file is moved aside once), every rank loads what it read
        found = [st is not None]
        dist.broadcast_object_list(found, src=0)
        st = load_tensors(ckpt, PAIR_TYPES, map_location=device) if found[0] and rank else st
    if st is not None:
        if st.get("world_size", 1) != size or bool(st.get("shards")) != sharded:
            written = "sharded" if st.get("shards") else "replicated"
            raise RuntimeError(
                f"{ckpt} was written by {st.get('world_size', 1)} {written} ranks; resume it with as many"
            )
        if sharded:
            load_sharded(policy, opt, ckpt.parent / st["shards"])
        else:
            policy.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"][rank])
        set_rng_state(st["rng"][rank])
        scaler, sampler = HeadScaler(**st["scaler"]), PromptSampler(**st["sampler"])
        offline, progress = st["offline"], st["progress"]
        progress["resumed_at"].append(st["iteration"])
    else:
        scaler, ref_row, before = start_scores(policy, reference, tok, task, cfg, evaluate, device, size)
        offline = None
        if tc.data.value == "offline" and sharded:  # every rank in the reference's forwards: no cache
            with ctx():
                offline = offline_pairs(reference, tok, task, train_prompts, scaler, cfg, chunk, cache=False)
            offline = broadcast_object(offline)  # rank 0's: GPU sampling need not match bit for bit
        elif tc.data.value == "offline":  # a fixed pair set from the reference, labeled once, cached
            for turn in (0, 1) if size > 1 else (0,):  # rank 0 builds the cache, then the others read it
                if (rank == 0) == (turn == 0):
                    with ctx():
                        offline = offline_pairs(reference, tok, task, train_prompts, scaler, cfg, chunk)
                if size > 1:
                    dist.barrier()
        sampler = PromptSampler(len(train_prompts), cfg.seed)
        progress = {
            "iteration": 0,
            "curves": [{"iteration": 0, **_curve_row(ref_row)}],
            "reference": ref_row,
            "samples_before": before,
            "steps": [],
            "resumed_at": [],
            "timings": {"gen_s": 0.0, "gen_tokens": 0, "train_s": 0.0, "train_tokens": 0},
        }
    agg_state = progress.get("agg_state") or {}
    timing = progress["timings"]
    monitor.start(tc.iterations, st["iteration"] if st is not None else None)
    if st is None:
        monitor.evaluation(0, progress["reference"])
    generator = None  # started after any resume, so that it holds the loaded weights
    if offline is None:
        options = OmegaConf.to_container(tc.generator_options, resolve=True)
        generator = make_generator(tc.generator, policy, tok, **options)
    last = None  # the evaluation at the last iteration, which is the final one
    for it in range(progress["iteration"] + 1, tc.iterations + 1):
        idx = shard(sampler.take(tc.batch_size), rank, size)  # this rank's block of the global batch
        t0 = time.perf_counter()
        if offline is None:
            with ctx():
                batch, samples = sample_pairs(
                    policy, tok, task, [train_prompts[i] for i in idx], scaler, gen, cfg, generator
                )
            timing["gen_tokens"] += samples.new_tokens
        else:
            batch = offline.select(torch.tensor(idx))
        t1 = time.perf_counter()
        batch.seqs = batch.seqs.to(device)
        if batch.anchor is None or cfg.method.anchor.value == "prev_iterate":
            anchor_model = reference if cfg.method.anchor.value == "fixed_ref" else policy
            with ctx():
                batch.anchor = chunked_logps(anchor_model, batch.seqs, temperature, chunk).view(2, -1).T
        batch.anchor, batch.rewards, batch.pref = (
            t.to(device) for t in (batch.anchor, batch.rewards, batch.pref)
        )
        policy.train()
        opt.zero_grad(set_to_none=True)
        # a sharded policy stays gathered through the W penalty's double backward (distributed.gathered)
        with ctx(), gathered(policy) if wasserstein else nullcontext():
            stats = methods.backward_robust(
                method,
                radius,
                batch.m,
                partial(batch.losses, policy, method, hparams, temperature),
                micro_batch=tc.micro_batch,
                groups=batch.groups,
                state=agg_state,
                w_form=cfg.method.w_form.value,
                group_options=groups,
            )
        agg_state = stats.state or agg_state
        step = {"robust_value": float(stats.value), **methods.weight_diagnostics(method, stats)}
        sum_gradients(policy)  # every rank now holds the global batch's gradient (or its shard of it)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        t2 = time.perf_counter()
        timing["gen_s"] += t1 - t0
        timing["train_s"] += t2 - t1
        timing["train_tokens"] += batch.seqs.tokens
        if generator is not None:  # the next rollout samples the stepped weights (hf: nothing to do)
            generator.sync(policy)
            timing["gen_s"] += time.perf_counter() - t2
        progress["steps"].append({"iteration": it, **step})
        monitor.iteration(it, {**step, "gen_s": t1 - t0, "train_s": t2 - t1})
        if it % tc.eval_every == 0 or it == tc.iterations:
            row, shown = evaluate(policy, scaler=scaler, iteration=it)
            progress["curves"].append({"iteration": it, **step, **_curve_row(row)})
            monitor.evaluation(it, row)
            if it == tc.iterations:  # the final evaluation: the same seed, so the same numbers
                last = row, shown
            if on_eval is not None:  # e.g. bench tune's pruner; StopRun from it ends the run
                on_eval(it, row)
        progress["iteration"], progress["agg_state"] = it, agg_state
        stop = stop_requested() if size == 1 else any(gather_rows([stop_requested()]))
        periodic = tc.checkpoint_every and it % tc.checkpoint_every == 0
        if (periodic or stop) and it < tc.iterations:
            streams = gather_rows([(gen.get_state(), rng_state())])  # every rank's, in rank order
            shards = save_sharded(policy, opt, ckpt.parent, it) if sharded else None  # every rank's part
            if rank == 0:  # replicated: the weights and optimizer state are the same on every rank
                save_tensors(
                    ckpt,
                    {
                        "iteration": it,
                        "model": None if sharded else policy.state_dict(),
                        "optimizer": None if sharded else opt.state_dict(),
                        "shards": shards,
                        "scheduler": sched.state_dict(),
                        "generator": [g for g, _ in streams],
                        "rng": [r for _, r in streams],
                        "scaler": scaler.state(),
                        "sampler": vars(sampler).copy(),
                        "offline": offline,
                        "progress": progress,
                        "world_size": size,
                    },
                )
                if sharded:  # checkpoint.pt now names the new shards: the older ones can go
                    remove_shards(ckpt.parent, keep=shards)
            if stop:
                raise Interrupted(f"stopped at iteration {it} of {tc.iterations}; checkpointed in {ckpt}")

    final, after = last or evaluate(policy, scaler=scaler, iteration=tc.iterations)
    if generator is not None:
        generator.close()
    monitor.table("samples/before", progress["samples_before"])
    monitor.table("samples/after", after)
    monitor.finish(final)
    per_rank = gather_rows([(timing["gen_tokens"], timing["train_tokens"], peak_memory_mb())])
    timing["gen_tokens"] = sum(g for g, _, _ in per_rank)  # the global batch's tokens
    timing["train_tokens"] = sum(t for _, t, _ in per_rank)
    n_params = sum(p.numel() for p in policy.parameters())
    extra = {}
    if tc.save_model:
        save_policy(policy, tok, Path(run_dir) / "policy", rank)
    if tc.lmeval_tasks:
        from bench.loops.capability import lmeval_scores

        extra["capabilities"] = lmeval_scores(policy.eval(), tok, list(tc.lmeval_tasks))
    return {
        **extra,
        "metrics": final,
        "reference": progress["reference"],
        "curves": progress["curves"],
        "steps": progress.get("steps", []),
        "samples": {"before": progress["samples_before"], "after": after},
        "resumed_at": progress["resumed_at"],
        "timings": {
            **timing,
            "s_per_iteration": (timing["gen_s"] + timing["train_s"]) / tc.iterations,
            "gen_tokens_per_s": timing["gen_tokens"] / max(timing["gen_s"], 1e-9),
            "train_tokens_per_s": timing["train_tokens"] / max(timing["train_s"], 1e-9),
            "peak_memory_mb": peak_memory_mb(),
            "peak_memory_mb_per_rank": [m for _, _, m in per_rank],
            "world_size": size,
            "sharding": "fsdp" if sharded else "replicate" if size > 1 else "none",
            "device": str(device),
            **utilisation(
                n_params,
                timing["train_tokens"],
                timing["gen_tokens"],
                timing["gen_s"] + timing["train_s"],
                device,
            ),
        },
        "model": {"class": type(policy).__name__, "parameters": n_params},
    }


def save_policy(policy, tok, folder: Path, rank: int) -> None:
    """The policy as a transformers checkpoint, from rank 0 (a sharded one gathered to it first)."""
    state = None
    if is_sharded(policy):
        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        policy.save_pretrained(folder, state_dict=state)
        tok.save_pretrained(folder)


def _curve_row(scores: dict) -> dict:
    keys = ("worst_case", "worst_case_selected", "mean_over_test", "train_reward", "val_worst_case", "kl_ref")
    keys = (*keys, "response_len")
    return {k: scores[k] for k in keys}
