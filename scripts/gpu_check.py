"""The README's GPU figures, one per invocation (``scripts/gpu-check.sh`` runs them all, smallest
first, each under its own ``timeout``; see ../shared/docs/gpu.md):

    python scripts/gpu_check.py FIGURE --device cuda|cpu --out DIR

Each figure appends one JSON line to ``DIR/gpu.jsonl``: what ran (dtype, shapes, batch, lengths,
torch/transformers versions, device) and its numbers, or ``error`` / ``skipped`` with why. Models
have random weights from published configs (``tasks.shapes``): nothing is downloaded. With
``--device cpu`` the same code runs on tiny shapes (a dry run). Times are CUDA-synchronized, after
a warm-up; memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

Figures: ``env``; ``lexicon-cell`` (one real cell through ``bench run``); ``generate`` (the
Llama-3.2-1B shape through ``bench.core.lm.sample`` against the memory-bandwidth bound);
``train-step`` (REBEL and W-REBEL steps of that shape, as the loop takes them, against
``bench plan``'s estimate); ``reward-score`` (the 8B ArmoRM shape in bf16 scoring sequences).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

GIB = 2**30
LLAMA_1B = "meta-llama/Llama-3.2-1B-Instruct"
TINY_LLAMA = {  # the CPU dry run's stand-in for a Llama-3.2 shape
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rope_theta": 500000.0,
}
# the lexicon cell: tests/conftest.py's LEXICON_FAST, with more iterations on the GPU
LEXICON = (
    "task.pretrain_steps=60",
    "task.n=24",
    "task.n_val=8",
    "task.n_test=12",
    "task.max_new_tokens=8",
    "train.batch_size=6",
    "eval.samples=1",
)


@dataclass(frozen=True)
class Sizes:
    """What each figure runs at: the GPU's published shapes, or the dry run's tiny ones."""

    policy: dict  # a config of tasks.shapes' form (model_type and fields)
    reward: dict
    gating: tuple[int, ...]  # ArmoRM's gating pattern (token ids inside the reward vocabulary)
    prompts: int  # generate: prompts per call, samples each, prompt and new tokens
    samples: int
    prompt_len: int
    new_tokens: int
    pairs: int  # train-step: pairs per step (one micro-batch), prompt and response tokens
    prompt_tokens: int
    response_tokens: int
    score_rows: int  # reward-score: sequences, their length, rows per forward
    score_len: int
    score_batches: tuple[int, ...]
    lexicon: tuple[str, ...]  # bench run overrides of the lexicon cell


def sizes(device: torch.device) -> Sizes:
    """The published shapes on a GPU, tiny ones on the CPU."""
    from tasks.armorm import ARMORM
    from tasks.armorm_model import HEAD_DEFAULTS, PUBLISHED_GATING_IDS
    from tasks.shapes import config_of

    head = {**HEAD_DEFAULTS, "rms_norm_eps": 1e-5}  # as tasks.armorm.armorm_models
    if device.type == "cuda":
        return Sizes(
            policy=config_of(LLAMA_1B),
            reward=head | config_of(ARMORM),
            gating=PUBLISHED_GATING_IDS,
            prompts=64,
            samples=2,
            prompt_len=128,
            new_tokens=256,
            pairs=2,
            prompt_tokens=1024,
            response_tokens=1024,
            score_rows=64,
            score_len=1024,
            score_batches=(8, 32),  # task.reward_batch's default, and a larger one
            lexicon=(*LEXICON, "train.iterations=20", "train.eval_every=10"),
        )
    tiny_head = head | {"gating_hidden_dim": 32}
    return Sizes(
        policy=TINY_LLAMA,
        reward=tiny_head | TINY_LLAMA | {"tie_word_embeddings": False},
        gating=(1, 2, 3, 4, 5),
        prompts=4,
        samples=2,
        prompt_len=8,
        new_tokens=8,
        pairs=2,
        prompt_tokens=16,
        response_tokens=16,
        score_rows=4,
        score_len=32,
        score_batches=(2, 4),
        lexicon=(*LEXICON, "train.iterations=4", "train.eval_every=2"),
    )


# ---- helpers ---------------------------------------------------------------------------------------


def versions(device: torch.device) -> dict:
    """What every line records: versions and the device."""
    import transformers

    from bench.studies.perf import machine

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int = 1) -> tuple[object, list[float]]:
    """The last result of ``reps`` calls of ``fn`` and the seconds of each, between device
    synchronizations."""
    result, seconds = None, []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return result, seconds


def reset_memory(device: torch.device) -> None:
    """Free what was dropped and start a new peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak GiB allocated and reserved since ``reset_memory`` (CUDA), and the process's peak RSS."""
    from bench.core.resources import peak_memory_mb

    out = {"rss_gib": peak_memory_mb()["rss"] / 1024}
    if device.type == "cuda":
        out["allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return out


def build_llama(config: dict, device: torch.device, dtype: torch.dtype):
    """A causal LM of ``config`` (``tasks.shapes``' form) with random weights, built on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(config)
    cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def n_params(model: torch.nn.Module) -> int:
    """Parameters of ``model`` (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


def kv_dim(config: dict) -> int:
    """Width of one layer's keys (or values) per token."""
    return config["num_key_value_heads"] * config["head_dim"]


def reference_gpu(device: torch.device):
    """The datasheet figures to compare with: this GPU's (``bench.harness.plan``), or the H200's."""
    from bench.harness.plan import GPUS, local_gpu

    return (local_gpu() if device.type == "cuda" else None) or GPUS["H200"]


# ---- figures ---------------------------------------------------------------------------------------


def figure_env(device: torch.device, _: Sizes, out: Path) -> dict:
    """The device, its memory and bf16 support."""
    info: dict = {"cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "memory_gib": props.total_memory / GIB,
            "sm_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def figure_lexicon_cell(device: torch.device, size: Sizes, out: Path) -> dict:
    """One lexicon REBEL cell through ``bench run --cluster debug`` on the device; its record's timings."""
    from bench.cli import main

    results = out / "lexicon-results"
    shutil.rmtree(results, ignore_errors=True)  # a completed record would be skipped, not rerun
    results.mkdir(parents=True)
    args = ["run", "--task", "lexicon", "--methods", "rebel", "--cluster", "debug", "--quiet"]
    args += ["--results", str(results), f"train.device={device.type}", *size.lexicon]
    start = time.perf_counter()
    rc = main(args)
    wall = time.perf_counter() - start
    records = sorted(results.rglob("record.json"))
    if not records:
        return {"command": "bench " + " ".join(args), "rc": rc, "error": "no record.json written"}
    record = json.loads(records[0].read_text())
    keys = ("s_per_iteration", "gen_tokens_per_s", "train_tokens_per_s", "peak_memory_mb", "mfu", "device")
    timings = record.get("timings", {})
    return {
        "command": "bench " + " ".join(args),
        "rc": rc,
        "status": record.get("status"),
        "record_error": (record.get("error") or {}).get("message"),
        "wall_s": wall,
        "model": record.get("model"),
        **{k: timings.get(k) for k in keys},
    }


def figure_generate(device: torch.device, size: Sizes, out: Path) -> dict:
    """Decoding tokens/s through ``bench.core.lm.sample`` (transformers ``generate``, KV cache), in
    bf16 weights and as the loop samples (fp32 master weights under bf16 autocast), against the
    memory-bandwidth bound: weights (bf16) and the KV cache read once per decoding step."""
    from tokenizers import pre_tokenizers

    from bench.core.lm import Sampling, sample
    from bench.harness.plan import BANDWIDTH_EFFICIENCY, LAUNCH_S_PER_LAYER
    from bench.loops.train import precision, uses_bf16
    from bench.studies.perf import _word_tokenizer

    config, gpu = size.policy, reference_gpu(device)
    vocab, layers = config["vocab_size"], config["num_hidden_layers"]
    tok = _word_tokenizer(vocab)  # one word per id: prompts are built as ids
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (size.prompts, size.prompt_len), generator=gen).tolist()
    prompts = [" ".join(f"w{i}" for i in row) for row in ids]
    settings = Sampling(size.new_tokens, temperature=0.7, top_k=50, batch_size=size.prompts)  # armorm's
    rows = size.prompts * size.samples
    runs = []
    for weights in ("bf16", "fp32+autocast"):
        dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        model = build_llama(config, device, dtype).eval()
        reset_memory(device)
        with nullcontext() if weights == "bf16" else precision(device, "auto"):
            sample(model, tok, prompts[:2], size.samples, replace(settings, max_new_tokens=8))  # warm-up
            torch.manual_seed(0)
            samples, [seconds] = timed(partial(sample, model, tok, prompts, size.samples, settings), device)
        params = n_params(model)
        context_len = size.prompt_len + size.new_tokens / 2  # mean tokens in the cache over the decode
        step_bytes = 2 * params + rows * context_len * layers * 2 * kv_dim(config) * 2
        plan_step = max(step_bytes / (BANDWIDTH_EFFICIENCY * gpu.bandwidth), LAUNCH_S_PER_LAYER * layers)
        bound = rows * gpu.bandwidth / step_bytes
        runs.append(
            {
                "weights": weights,
                "autocast_bf16": weights != "bf16" and uses_bf16(device, "auto"),
                "parameters": params,
                "new_tokens": samples.new_tokens,
                "max_new_tokens": rows * size.new_tokens,
                "seconds": seconds,
                "tokens_per_s": samples.new_tokens / seconds,
                "bandwidth_bound_tokens_per_s": bound,
                "fraction_of_bound": samples.new_tokens / seconds / bound,
                "plan_tokens_per_s": rows / plan_step,
                "peak_memory": peak_memory(device),
            }
        )
        del model
    return {
        "model": LLAMA_1B if device.type == "cuda" else "tiny llama",
        "config": config,
        "prompts": size.prompts,
        "samples_per_prompt": size.samples,
        "prompt_tokens": size.prompt_len,
        "new_tokens_per_sample": size.new_tokens,
        "sampling": asdict(settings),
        "bound": f"(2 B x parameters + KV cache at the mean length) per step at {gpu.name}'s "
        f"{gpu.bandwidth / 1e12:.2f} TB/s; seconds include the prefill",
        "runs": runs,
    }


def figure_train_step(device: torch.device, size: Sizes, out: Path) -> dict:
    """REBEL and W-REBEL steps as ``bench.loops.train`` takes them (``bench.studies.perf.step``: the
    bf16 reference's anchors, losses, robust objective, backward, clipping, AdamW) on fp32 master
    weights under bf16 autocast with gradient checkpointing, one micro-batch of ``pairs`` pairs;
    seconds, tokens/s, MFU and peak memory beside ``bench plan``'s estimate of the armorm 1B cell."""
    import methods
    from bench.harness.plan import GPUS, MFU, estimate
    from bench.harness.runner import Cell
    from bench.loops.train import disable_dropout, enable_checkpointing, precision, uses_bf16
    from bench.studies.perf import PerfConfig, _radius, pair_batch, step
    from methods.wasserstein import double_backprop_attention

    config, gpu = size.policy, reference_gpu(device)
    shape = PerfConfig(batch=size.pairs, prompt_len=size.prompt_tokens, response_len=size.response_tokens)
    runs = []
    for name in ("rebel", "w-rebel"):
        method = methods.get(name)
        wasserstein = method.aggregator.kind == "wasserstein"
        policy = build_llama(config, device, torch.float32)
        disable_dropout(policy)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if uses_bf16(device, "auto"):
            reference.to(torch.bfloat16)  # as the loop holds it on CUDA
        enable_checkpointing(policy, double_backprop_attention if wasserstein else None)
        policy.train()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
        batch = pair_batch(config["vocab_size"], shape)
        batch.seqs = batch.seqs.to(device)
        batch.rewards, batch.pref = batch.rewards.to(device), batch.pref.to(device)

        def once(method=method, policy=policy, opt=opt, batch=batch, reference=reference, name=name):
            with precision(device, "auto"):
                step(policy, opt, method, batch, _radius(name), reference)

        reset_memory(device)
        run: dict = {"method": name}
        try:
            once()  # warm-up (and AdamW's state)
            _, times = timed(once, device, 3)
        except torch.cuda.OutOfMemoryError as err:
            run["error"] = f"out of memory: {str(err).splitlines()[0]}"
        else:
            params, tokens = n_params(policy), batch.seqs.tokens
            seconds = sorted(times)[1]
            model_flops = (6 + 2) * params * tokens  # policy forward + backward, reference forward
            plan_flops = ((6 + 2) * (1.7 if wasserstein else 1.0) + 2) * params * tokens  # its roofline
            est = estimate(Cell("armorm", name, 0, ("task.size=1b",)), GPUS["H200"])
            reward = 2 * est.models.get("reward", 0) / GIB  # the reward model this step does not hold
            run |= {
                "parameters": params,
                "tokens": tokens,
                "seconds": times,
                "s_per_step": seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": model_flops / seconds / gpu.bf16_flops,
                "hfu_with_recompute": (model_flops + 2 * params * tokens) / seconds / gpu.bf16_flops,
                "plan_roofline_s": plan_flops / (MFU * gpu.bf16_flops),
                "peak_memory": peak_memory(device),
                "estimate_armorm_1b_h200": {
                    "static_gib": est.static_gb,
                    "train_gib": est.train_gb,
                    "generate_gib": est.generate_gb,
                    "peak_gib": est.peak_gb,
                    "s_per_iteration": est.s_per_iteration,
                    # the same pieces without the reward model, slack or CUDA context: what this holds
                    "policy_reference_train_gib": est.static_gb - reward + est.train_gb,
                },
            }
        runs.append(run)
        del policy, reference, opt, batch, once
    return {
        "model": LLAMA_1B if device.type == "cuda" else "tiny llama",
        "config": config,
        "pairs": size.pairs,
        "rows": 2 * size.pairs,
        "prompt_tokens": size.prompt_tokens,
        "response_tokens": size.response_tokens,
        "precision": "fp32 master weights, bf16 autocast" if uses_bf16(device, "auto") else "fp32",
        "reference_dtype": "bf16" if uses_bf16(device, "auto") else "fp32",
        "grad_checkpointing": True,
        "optimizer": "AdamW lr 1e-5",
        "timing": "median of 3 steps after a warm-up step",
        "mfu_basis": f"(6 + 2) x parameters x tokens per step (policy, reference; no recompute, no W double "
        f"backward) over {gpu.name}'s {gpu.bf16_flops / 1e12:.0f} TFLOP/s dense bf16 (datasheet)",
        "runs": runs,
    }


def figure_reward_score(device: torch.device, size: Sizes, out: Path) -> dict:
    """The 8B ArmoRM shape (``tasks.armorm_model.ArmoRMScorer``) in bf16 with random weights scoring
    ``score_rows`` sequences of ``score_len`` tokens: sequences/s and peak memory per batch size."""
    from tasks.armorm_model import ArmoRMScorer

    gpu = reference_gpu(device)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = ArmoRMScorer(size.reward, size.gating)
        model = model.to(torch.bfloat16).requires_grad_(False).eval()
    except Exception as err:  # e.g. a LlamaConfig that refuses the published fields
        return {"skipped": f"could not build the ArmoRM shape: {type(err).__name__}: {err}"}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, size.reward["vocab_size"], (size.score_rows, size.score_len), generator=gen)
    at = size.score_len // 2  # the assistant turn's start, where the gate reads
    ids[:, at : at + len(size.gating)] = torch.tensor(size.gating)
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    params = n_params(model)
    runs = []
    for rows in size.score_batches:

        def score(rows=rows):
            with torch.inference_mode():
                for lo in range(0, size.score_rows, rows):
                    model(input_ids=ids[lo : lo + rows], attention_mask=mask[lo : lo + rows])

        reset_memory(device)
        try:
            with torch.inference_mode():
                model(input_ids=ids[:rows], attention_mask=mask[:rows])  # warm-up
            _, [seconds] = timed(score, device)
        except torch.cuda.OutOfMemoryError as err:
            runs.append({"batch": rows, "error": f"out of memory: {str(err).splitlines()[0]}"})
            continue
        flops = 2 * params * size.score_rows * size.score_len
        runs.append(
            {
                "batch": rows,
                "seconds": seconds,
                "sequences_per_s": size.score_rows / seconds,
                "tokens_per_s": size.score_rows * size.score_len / seconds,
                "mfu": flops / seconds / gpu.bf16_flops,
                "peak_memory": peak_memory(device),
            }
        )
    return {
        "model": "ArmoRM-Llama3-8B shape" if device.type == "cuda" else "tiny ArmoRM",
        "parameters": params,
        "dtype": "bf16",
        "attention": getattr(model.model.config, "_attn_implementation", None),
        "sequences": size.score_rows,
        "tokens_per_sequence": size.score_len,
        "runs": runs,
    }


FIGURES: dict[str, Callable[[torch.device, Sizes, Path], dict]] = {
    "env": figure_env,
    "lexicon-cell": figure_lexicon_cell,
    "generate": figure_generate,
    "train-step": figure_train_step,
    "reward-score": figure_reward_score,
}


def main(argv: list[str] | None = None) -> int:
    """Run one figure and append its line (or its error) to ``--out``/gpu.jsonl; 1 on an error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=list(FIGURES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    line: dict = {"figure": args.figure, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    start = time.perf_counter()
    try:
        line |= versions(device)
        line |= FIGURES[args.figure](device, sizes(device), args.out)
    except Exception as err:
        line["error"] = f"{type(err).__name__}: {err}"
        line["traceback"] = traceback.format_exc().splitlines()[-12:]
    line["figure_s"] = time.perf_counter() - start
    text = json.dumps(line, default=str)
    with open(args.out / "gpu.jsonl", "a") as handle:
        handle.write(text + "\n")
    print(text)
    return 1 if "error" in line else 0


if __name__ == "__main__":
    sys.exit(main())
