"""bench perf: what robustness costs, measured in one process so that ratios are comparable.

1. Step time of every method relative to its non-robust base (REBEL, DPO, IPO) on the same batch
   and model (random-init GPT-2s of the official-perf shapes: tiny 2x64, small 6x256), repetitions
   interleaved across methods so that machine noise hits all alike. A step is the whole training
   step of ``bench.loops.train``: the frozen reference's forward for the anchors, the losses, the
   robust objective and its backward, gradient clipping and the optimizer step. The batched
   Wasserstein penalty is set against a per-sample ``autograd.grad`` loop (the official
   implementation's pattern), each with a warm-up and the median of its rounds.
2. The exact dual solvers against n (1e3 .. 1e6) and the official O(n^2) chi-square candidate
   search (up to 1e5; it does not finish at 1e6), with the fitted log-log slope. The official
   search is timed with Python's garbage collector paused: its loop over a tensor creates a
   Python object per candidate, and the collections they trigger (scanning every live object of
   the process, here the models of part 1) cost 10x the arithmetic, which says nothing of the
   authors' code.
3. Generation and training throughput (tokens/s) and peak memory.
4. Evaluation cost against the number of test mixtures: heads are scored once, mixtures are
   weight vectors on them.
"""

from __future__ import annotations

import copy
import gc
import math
import platform
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import methods
from bench.core.lm import Sampling, SequenceBatch, sample
from bench.core.resources import peak_memory_mb
from bench.harness.records import write_json_atomic
from methods.robust import chi2_weights, kl_constrained, tv_weights
from methods.wasserstein import double_backprop_attention

SHAPES = {"tiny": (2, 64, 2, 2048), "small": (6, 256, 8, 8000)}  # layers, width, heads, vocab
POLICY_LOSSES = ("rebel", "dpo", "ipo")  # the bt family trains reward models, measured elsewhere


@dataclass
class PerfConfig:
    threads: int = 1  # torch threads: 1 is stable on a shared machine; ratios come from one process
    models: tuple[tuple[str, int, int], ...] = (
        ("tiny", 64, 15),
        ("small", 16, 5),
        ("small", 64, 3),
    )  # shape, pairs, repetitions
    loop_max_activations: int = 2_000_000  # the per-sample W loop only below pairs x tokens x layers x width
    batch: int = 64
    prompt_len: int = 16
    response_len: int = 24
    dual_ns: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    loop_reps: int = 3  # rounds of the per-sample Wasserstein loop (after a warm-up)
    official_ns: tuple[int, ...] = (1_000, 10_000, 100_000)


def build_model(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads, vocab = SHAPES[name]
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def pair_batch(vocab: int, cfg: PerfConfig):
    """A fixed batch of m pairs: shared prompt rows, two responses each, anchors and labels."""
    from bench.loops.train import PairBatch

    gen = torch.Generator().manual_seed(0)
    m, t = cfg.batch, cfg.prompt_len + cfg.response_len
    ids = torch.randint(1, vocab, (2 * m, t), generator=gen)
    ids[m:, : cfg.prompt_len] = ids[:m, : cfg.prompt_len]
    target = torch.zeros(2 * m, t - 1, dtype=torch.bool)
    target[:, cfg.prompt_len - 1 :] = True
    seqs = SequenceBatch(ids, torch.ones_like(ids), target)
    return PairBatch(
        seqs,
        torch.randn(m, 2, generator=gen),
        torch.bernoulli(torch.full((m,), 0.5), generator=gen),
        torch.randint(0, 3, (m,), generator=gen),
        anchor=-torch.rand(m, 2, generator=gen) * 60,
    )


def _hparams(method) -> dict:
    return {"eta": 0.01} if method.loss == "rebel" else {"beta": 0.1}


def step(policy, opt, method, batch, radius: float, reference=None) -> float:
    """One training step of ``method`` as the loop takes it (the reference's anchor forward when
    given, losses, robust objective, backward, clipping at norm 1, AdamW); seconds."""
    from bench.core.lm import chunked_logps

    start = time.perf_counter()
    if reference is not None:
        batch.anchor = chunked_logps(reference, batch.seqs, 1.0).view(2, -1).T
    opt.zero_grad(set_to_none=True)
    methods.backward_robust(
        method,
        radius,
        batch.m,
        lambda rows: batch.losses(policy, method, _hparams(method), 1.0, rows),
        groups=batch.groups,
        state={},
    )
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - start


def loop_wasserstein_step(policy, opt, batch, rho0: float, reference=None) -> float:
    """W-REBEL as the official code computes it: one double-backward ``autograd.grad`` per sample
    (with the same anchor forward, clipping and optimizer step as ``step``)."""
    from bench.core.lm import chunked_logps

    method = methods.get("w-rebel")
    start = time.perf_counter()
    if reference is not None:
        batch.anchor = chunked_logps(reference, batch.seqs, 1.0).view(2, -1).T
    opt.zero_grad(set_to_none=True)
    seqs = batch.rows(torch.arange(batch.m))
    embeds = policy.get_input_embeddings()(seqs.input_ids)
    from bench.core.lm import sequence_logps

    with double_backprop_attention():
        logps = sequence_logps(policy, seqs, 1.0, inputs_embeds=embeds)
    scores = methods.PairScores(logps.view(2, -1).T, batch.anchor, batch.rewards, batch.pref)
    losses = methods.pointwise_losses(method, scores, eta=0.01)
    norms = []
    for i in range(batch.m):
        (g,) = torch.autograd.grad(losses[i], embeds, create_graph=True, retain_graph=True)
        norms.append(g[i].pow(2).sum() + g[i + batch.m].pow(2).sum())
    (losses.mean() + rho0 * torch.sqrt(torch.stack(norms).mean() + 1e-12)).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - start


def bench_steps(cfg: PerfConfig) -> list[dict]:
    rows = []
    for name, size, reps in cfg.models:
        policy = build_model(name)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        batch = pair_batch(SHAPES[name][3], replace(cfg, batch=size))
        names = [n for n in methods.names() if methods.get(n).loss in POLICY_LOSSES]
        times = {n: [] for n in names}
        for n in names:  # warm-up
            step(policy, opt, methods.get(n), batch, _radius(n), reference)
        for rep in range(reps):  # a fresh random order each round: no method always runs first
            order = list(names)
            random.Random(rep).shuffle(order)
            for n in order:
                times[n].append(step(policy, opt, methods.get(n), batch, _radius(n), reference))
        med = {n: statistics.median(v) for n, v in times.items()}
        tokens = int(batch.seqs.attention_mask.sum())
        for n in names:
            base = methods.get(n).base
            rows.append(
                {
                    "model": name,
                    "batch": size,
                    "method": n,
                    "step_s": med[n],
                    "ratio_to_base": med[n] / med[base],
                    "train_tokens_per_s": tokens / med[n],
                }
            )
        layers, width = SHAPES[name][:2]
        if size * (cfg.prompt_len + cfg.response_len) * layers * width > cfg.loop_max_activations:
            continue  # the loop keeps a double-backward graph per sample: minutes and tens of GB here
        loop_wasserstein_step(policy, opt, batch, 0.01, reference)  # warm-up
        loop = statistics.median(
            loop_wasserstein_step(policy, opt, batch, 0.01, reference) for _ in range(cfg.loop_reps)
        )
        rows.append(
            {
                "model": name,
                "batch": size,
                "method": "w-rebel (per-sample loop)",
                "step_s": loop,
                "ratio_to_base": loop / med["w-rebel"],  # against the batched W step it replaces
                "train_tokens_per_s": tokens / loop,
            }
        )
    return rows


def _radius(name: str) -> float:
    knob = methods.get(name).knob
    return knob.default if knob else 0.0


def official_chi2_search(losses: torch.Tensor, rho: float) -> float:
    """The official DRO-REBEL search: F(c) for every candidate with a host sync each (O(n^2))."""
    candidates = torch.cat([losses.min().view(1) - 1, torch.unique(losses), losses.max().view(1) + 1])
    n = losses.numel()
    best = math.inf
    paused = gc.isenabled()
    gc.disable()  # see the module docstring: collections would dominate the per-candidate cost
    try:
        for c in candidates:
            value = float(c + torch.sqrt(2 * rho / n * (losses - c).clamp_min(0).pow(2).sum()))
            best = min(best, value)
    finally:
        if paused:
            gc.enable()
    return best


def bench_duals(cfg: PerfConfig) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in cfg.dual_ns:
        losses = torch.rand(n, generator=gen, dtype=torch.float64) * 3
        for label, fn, radius in (
            ("chi2", chi2_weights, 0.1),
            ("kl-ball", kl_constrained, 0.1),
            ("tv", tv_weights, 0.1),
        ):
            fn(losses, radius)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn(losses, radius)
                times.append(time.perf_counter() - start)
            rows.append({"solver": label, "n": n, "seconds": statistics.median(times)})
    for n in cfg.official_ns:
        losses = torch.rand(n, generator=gen, dtype=torch.float64) * 3
        start = time.perf_counter()
        official_chi2_search(losses, 0.1)
        rows.append({"solver": "official chi2 search", "n": n, "seconds": time.perf_counter() - start})
    return rows


def slopes(rows: list[dict]) -> dict[str, float]:
    """Log-log slope of time against n (n >= 1e4 for the exact solvers, where overheads fade)."""
    out = {}
    for solver in sorted({r["solver"] for r in rows}):
        floor = 0 if solver.startswith("official") else 10_000
        pts = [(r["n"], r["seconds"]) for r in rows if r["solver"] == solver and r["n"] >= floor]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[solver] = float(np.polyfit(x, y, 1)[0])
    return out


def bench_generation(cfg: PerfConfig) -> list[dict]:
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    rows = []
    for name in dict.fromkeys(n for n, _, _ in cfg.models):
        policy = build_model(name).eval()
        vocab = {f"w{i}": i for i in range(SHAPES[name][3])}
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="w1")),
            eos_token="w0",
            pad_token="w0",
        )
        prompts = [" ".join(f"w{(i * 7 + j) % 500 + 2}" for j in range(cfg.prompt_len)) for i in range(16)]
        torch.manual_seed(0)
        settings = Sampling(max_new_tokens=cfg.response_len, temperature=1.0, top_p=1.0)
        sample(policy, tok, prompts[:2], 2, settings)
        torch.manual_seed(0)
        out = sample(policy, tok, prompts, 2, settings)
        rows.append(
            {
                "model": name,
                "prompts": 16,
                "samples_per_prompt": 2,
                "new_tokens": out.new_tokens,
                "seconds": out.seconds,
                "gen_tokens_per_s": out.new_tokens / out.seconds,
            }
        )
    return rows


def bench_eval_mixtures() -> list[dict]:
    """mixture_scores on fixed heads R[N, K] with the lexicon protocol and a 100x larger one."""
    from bench.loops.evaluate import mixture_scores
    from tasks.mixtures import Mixture, pair_protocol

    names = [f"h{k}" for k in range(11)]
    proto = pair_protocol(names, (4, 9), 0.5)
    gen = torch.Generator().manual_seed(0)
    heads = torch.randn(1000, 11, generator=gen, dtype=torch.float64)
    extra = tuple(
        Mixture(f"r{i}", tuple(torch.distributions.Dirichlet(torch.ones(11)).sample().tolist()))
        for i in range(len(proto.test) * 99)
    )
    big = type(proto)(proto.train, proto.val, proto.test + extra, proto.seen, proto.alpha0, names=proto.names)
    rows = []
    for label, p in (("34 mixtures", proto), (f"{len(big.test)} mixtures", big)):
        start = time.perf_counter()
        mixture_scores(heads, heads, p, bootstrap=1000)
        rows.append({"protocol": label, "mixtures": len(p.test), "seconds": time.perf_counter() - start})
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def run(cfg: PerfConfig, out: Path) -> dict:
    """Every measurement; writes perf.json and perf.md under ``out``; returns the results."""
    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    peaks = {}  # the process's peak RSS after each part: where the peak was reached

    def measured(name: str, rows: list[dict]) -> list[dict]:
        peaks[name] = peak_memory_mb()["rss"]
        return rows

    steps = measured("steps", bench_steps(cfg))
    duals = measured("duals", bench_duals(cfg))
    result = {
        "machine": machine(),
        "steps": steps,
        "duals": duals,
        "dual_slopes": slopes(duals),
        "generation": measured("generation", bench_generation(cfg)),
        "evaluation": measured("evaluation", bench_eval_mixtures()),
        "peak_memory_mb": peak_memory_mb(),
        "peak_rss_mb_after": peaks,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "perf.json", result)
    (out / "perf.md").write_text(format_tables(result))
    return result


def format_tables(result: dict) -> str:
    import pandas as pd

    steps = pd.DataFrame(result["steps"])
    steps["model"] = [f"{m} b{b}" for m, b in zip(steps.model, steps.batch, strict=True)]
    wide = steps.pivot_table(index="method", columns="model", values="ratio_to_base", sort=False)
    secs = steps.pivot_table(index="method", columns="model", values="step_s", sort=False)
    table = pd.concat({"step s": secs, "x base": wide}, axis=1)
    duals = pd.DataFrame(result["duals"]).pivot_table(
        index="solver", columns="n", values="seconds", sort=False
    )
    parts = [
        f"Machine: {result['machine']}; peak RSS {result['peak_memory_mb']['rss']:.0f} MB (after "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mb_after"].items())
        + ").",
        "",
        "Step time per method (median of interleaved repetitions) and ratio to its base method:",
        "",
        table.to_markdown(floatfmt=".4f"),
        "",
        "Dual solvers, seconds against n (log-log slope over n >= 1e4: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["dual_slopes"].items())
        + "):",
        "",
        duals.to_markdown(floatfmt=".2e"),
        "",
        "Generation throughput:",
        "",
        pd.DataFrame(result["generation"]).to_markdown(index=False, floatfmt=".1f"),
        "",
        "Evaluation cost against the number of test mixtures (heads scored once; 1000 prompts, 1000 "
        "bootstrap replicates):",
        "",
        pd.DataFrame(result["evaluation"]).to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    return "\n".join(parts)
