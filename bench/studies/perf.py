"""bench perf: what robustness costs, measured in one process so that ratios are comparable.

1. Step time of every method relative to its non-robust base (REBEL, DPO, IPO) on the same batch
   and model (random-init GPT-2s of the official-perf shapes: tiny 2x64, small 6x256), repetitions
   interleaved across methods so that machine noise hits all alike. A step is the whole training
   step of ``bench.loops.train``: the frozen reference's forward for the anchors, the losses, the
   robust objective and its backward, gradient clipping and the optimizer step. The batched
   Wasserstein penalty is set against a per-sample ``autograd.grad`` loop (the official
   implementation's pattern, exact but backpropagated a few samples at a time to bound memory: see
   ``loop_wasserstein_backward``), each with a warm-up and the median of its rounds. Where ``trl``
   is installed, TRL's ``DPOTrainer`` step (``TrlDpo``) is one more arm of bench's ``dpo`` rounds,
   on copies of the same models and the same pair batch: bench dpo / TRL DPO per shape.
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
import functools
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
from methods.wasserstein import SQRT_EPS, double_backprop_attention

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
    loop_chunk_activations: int = 2_000_000  # its graphs held at once (memory): 6 samples at tiny/64
    trl: bool = True  # the TRL DPOTrainer arm, where trl is installed
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


def loop_wasserstein_backward(
    policy, batch, rho0: float, chunk: int = 0, timings: dict | None = None
) -> torch.Tensor:
    """W-REBEL's gradient as the official code computes it: one double-backward ``autograd.grad``
    per sample over the batched forward (``create_graph=True``); fills ``.grad``; returns the
    objective ``mean(l) + rho0·sqrt(mean_i ||d l_i / d z||^2 + eps)``.

    ``chunk`` (0 or >= the batch: the official single pass) bounds memory. The official loop keeps
    every sample's double-backward graph until one final backward (its memory grows as the square
    of the batch: 10 GB at tiny/64). Here the graphs of ``chunk`` samples at a time are
    backpropagated and freed: ``.grad`` first collects ``(1/n)·sum_i d G_i / d theta``
    (``G_i = ||d l_i / d z||^2``), then is multiplied by the sqrt's chain-rule coefficient
    ``rho0 / (2·sqrt(mean G + eps))`` once every ``G_i`` is known, then the mean loss's backward adds
    ``(1/n)·sum_i d l_i / d theta``: the same gradient, exactly (up to summation order), as the
    single pass and the batched W step. It does the same n per-sample double backwards; the cost
    it adds is ``ceil(n / chunk) - 1`` extra backward passes through the (first-order) forward
    graph, where the official final backward makes one, and a scaling of ``.grad``; ``timings``
    (when given) receives the seconds of the last of those passes (``loss_backward_s``), from which
    ``bench_steps`` estimates what the chunking adds.
    """
    from bench.core.lm import sequence_logps

    method = methods.get("w-rebel")
    n = batch.m
    chunk = n if chunk <= 0 else min(chunk, n)
    seqs = batch.rows(torch.arange(n))
    inputs: list[torch.Tensor] = []
    with double_backprop_attention():
        logps = sequence_logps(policy, seqs, 1.0, embeds=inputs)
    (embeds,) = inputs
    scores = methods.PairScores(logps.view(2, -1).T, batch.anchor, batch.rewards, batch.pref)
    losses = methods.pointwise_losses(method, scores, eta=0.01)
    if chunk == n:  # the official single pass: every graph kept until the one backward
        norms = []
        for i in range(n):
            (g,) = torch.autograd.grad(losses[i], embeds, create_graph=True, retain_graph=True)
            norms.append(g[i].pow(2).sum() + g[i + n].pow(2).sum())
        objective = losses.mean() + rho0 * torch.sqrt(torch.stack(norms).mean() + SQRT_EPS)
        objective.backward()
        return objective.detach()
    params = [q for q in policy.parameters() if q.requires_grad]
    values = []
    for lo in range(0, n, chunk):
        norms = []
        for i in range(lo, min(lo + chunk, n)):
            (g,) = torch.autograd.grad(losses[i], embeds, create_graph=True, retain_graph=True)
            norms.append(g[i].pow(2).sum() + g[i + n].pow(2).sum())
        block = torch.stack(norms)
        (block.sum() / n).backward(retain_graph=True)  # frees this block's double-backward graphs
        values.append(block.detach())
    mean_g = torch.cat(values).mean()
    root = torch.sqrt(mean_g + SQRT_EPS)
    coeff = rho0 / (2 * root)
    for q in params:
        if q.grad is not None:
            q.grad.mul_(coeff)
    start = time.perf_counter()
    losses.mean().backward()
    if timings is not None:
        timings["loss_backward_s"] = time.perf_counter() - start
    return losses.detach().mean() + rho0 * root


def loop_wasserstein_step(
    policy, opt, batch, rho0: float, reference=None, chunk: int = 0, timings: dict | None = None
) -> float:
    """W-REBEL with the official per-sample loop (``loop_wasserstein_backward``), with the same
    anchor forward, clipping and optimizer step as ``step``; seconds."""
    from bench.core.lm import chunked_logps

    start = time.perf_counter()
    if reference is not None:
        batch.anchor = chunked_logps(reference, batch.seqs, 1.0).view(2, -1).T
    opt.zero_grad(set_to_none=True)
    loop_wasserstein_backward(policy, batch, rho0, chunk, timings)
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - start


def trl_missing() -> str | None:
    """Why the TRL arm cannot run here (None when ``trl`` imports)."""
    try:
        import trl
    except ImportError as err:
        return f"trl is not installed ({err}); pip install -c constraints.txt -e '.[trl]'"
    return None if hasattr(trl, "DPOTrainer") else f"trl {trl.__version__} has no DPOTrainer"


def _word_tokenizer(vocab: int):
    """A word-level tokenizer with one token per id (``w<id>``), eos and pad ``w0``."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(words, unk_token="w1")),
        eos_token="w0",
        pad_token="w0",
    )


class TrlDpo:
    """TRL's ``DPOTrainer`` (sigmoid loss, beta 0.1) on a copy of the policy and of the reference,
    fed the token ids of ``batch`` (hard labels: the first response is the chosen one where
    ``pref`` is 1), collated once by TRL's ``DataCollatorForPreference``.

    One step is ``trainer.training_step`` (TRL's ``compute_loss``: its fused LM head over the policy,
    the reference forward, the loss and its logged metrics; then the backward through accelerate),
    clipping at norm 1 and the step of a ``torch.optim.AdamW(lr=1e-5)`` the trainer holds: what
    ``step`` times for bench's ``dpo``, in fp32 like it (TRL's defaults bf16 and gradient
    checkpointing are turned off), on the CPU with padding-free off and a reference model (bench
    computes the anchors with its reference every step too).
    """

    def __init__(self, policy, reference, batch, prompt_len: int, beta: float = 0.1):
        import tempfile
        import warnings

        import datasets
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.policy = copy.deepcopy(policy)
        self.reference = copy.deepcopy(reference)  # TRL patches the forward of both models
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-perf-trl-")
        threads = torch.get_num_threads()
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing's new name
                args = DPOConfig(
                    output_dir=self._dir.name,
                    beta=beta,
                    loss_type=["sigmoid"],
                    gradient_checkpointing=False,
                    bf16=False,
                    use_cpu=True,
                    padding_free=False,
                    precompute_ref_log_probs=False,
                    max_length=None,
                    report_to="none",
                    disable_tqdm=True,
                )
                # the trainer needs a dataset to build; the timed batch is collated below
                tiny = datasets.Dataset.from_dict(
                    {"prompt": ["w2 w3"], "chosen": [" w4"], "rejected": [" w5"]}
                )
                self.trainer = DPOTrainer(
                    model=self.policy,
                    ref_model=self.reference,
                    args=args,
                    train_dataset=tiny,
                    processing_class=_word_tokenizer(policy.config.vocab_size),
                    optimizers=(self.opt, None),
                )
        finally:
            if bars:
                datasets.enable_progress_bars()
            torch.set_num_threads(threads)
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        self.inputs = DataCollatorForPreference(pad_token_id=0)(trl_examples(batch, prompt_len))

    def loss(self) -> torch.Tensor:
        """TRL's DPO loss of the batch (no backward)."""
        self.policy.train()
        with torch.no_grad():
            return self.trainer.compute_loss(self.policy, self.inputs)

    def step(self) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.trainer.training_step(self.policy, self.inputs)
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        return time.perf_counter() - start


def trl_examples(batch, prompt_len: int) -> list[dict]:
    """``batch``'s pairs as TRL's tokenized preference examples (chosen: the preferred response)."""
    ids, m = batch.seqs.input_ids, batch.m
    if not bool(((batch.pref == 0) | (batch.pref == 1)).all()):
        raise ValueError("TRL's DPO takes hard labels; this batch has soft ones")
    out = []
    for i in range(m):
        chosen, rejected = (i, i + m) if float(batch.pref[i]) == 1.0 else (i + m, i)
        out.append(
            {
                "prompt_ids": ids[i, :prompt_len].tolist(),
                "chosen_ids": ids[chosen, prompt_len:].tolist(),
                "rejected_ids": ids[rejected, prompt_len:].tolist(),
            }
        )
    return out


def bench_dpo_loss(policy, reference, batch, beta: float = 0.1) -> torch.Tensor:
    """bench's DPO loss of ``batch`` (the mean of ``dpo_loss`` with the reference's anchors)."""
    from bench.core.lm import chunked_logps

    batch.anchor = chunked_logps(reference, batch.seqs, 1.0).view(2, -1).T
    with torch.no_grad():
        losses, _ = batch.losses(policy, methods.get("dpo"), {"beta": beta}, 1.0, torch.arange(batch.m))
    return losses.mean()


def loop_chunk(cfg: PerfConfig, name: str, size: int) -> int:
    """Samples whose double-backward graphs the per-sample loop holds at once (see
    ``loop_wasserstein_backward``): ``loop_chunk_activations`` over pairs x tokens x layers x width."""
    layers, width = SHAPES[name][:2]
    return max(1, cfg.loop_chunk_activations // (size * (cfg.prompt_len + cfg.response_len) * layers * width))


TRL_ARM = "dpo (TRL DPOTrainer)"


def bench_steps(cfg: PerfConfig) -> tuple[list[dict], dict]:
    """The step rows, and the TRL arm's record (its version and loss check, or why it was skipped)."""
    rows = []
    missing = trl_missing() if cfg.trl else "turned off (PerfConfig.trl)"
    trl_info: dict = {"skipped": missing, "loss_check": []}
    if missing is None:
        import trl

        trl_info["version"] = trl.__version__
    for name, size, reps in cfg.models:
        policy = build_model(name)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        batch = pair_batch(SHAPES[name][3], replace(cfg, batch=size))
        names = [n for n in methods.names() if methods.get(n).loss in POLICY_LOSSES]
        arms = {
            n: functools.partial(step, policy, opt, methods.get(n), batch, _radius(n), reference)
            for n in names
        }
        if missing is None:
            theirs = TrlDpo(policy, reference, batch, cfg.prompt_len)
            arms[TRL_ARM] = theirs.step
        times = {n: [] for n in arms}
        for n in arms:  # warm-up
            arms[n]()
        for rep in range(reps):  # a fresh random order each round: no arm always runs first
            order = list(arms)
            random.Random(rep).shuffle(order)
            for n in order:
                times[n].append(arms[n]())
        med = {n: statistics.median(v) for n, v in times.items()}
        if missing is None:  # after the rounds, where the policy has moved off its reference
            theirs.policy.load_state_dict(policy.state_dict())
            ours, their_loss = bench_dpo_loss(policy, reference, batch), theirs.loss()
            trl_info["loss_check"].append(
                {"model": name, "batch": size, "bench": float(ours), "trl": float(their_loss)}
            )
        tokens = int(batch.seqs.attention_mask.sum())
        for n in arms:
            base = "dpo" if n == TRL_ARM else methods.get(n).base
            row = {
                "model": name,
                "batch": size,
                "method": n,
                "step_s": med[n],
                "ratio_to_base": med[n] / med[base],
                "train_tokens_per_s": tokens / med[n],
            }
            if n == TRL_ARM:
                row["bench_dpo_over_trl"] = med["dpo"] / med[n]
            rows.append(row)
        layers, width = SHAPES[name][:2]
        if size * (cfg.prompt_len + cfg.response_len) * layers * width > cfg.loop_max_activations:
            continue  # the loop: n per-sample double backwards over the whole batch, minutes here
        chunk = loop_chunk(cfg, name, size)
        loop_wasserstein_step(policy, opt, batch, 0.01, reference, chunk)  # warm-up
        loops, passes = [], []
        for _ in range(cfg.loop_reps):
            timings: dict = {}
            loops.append(loop_wasserstein_step(policy, opt, batch, 0.01, reference, chunk, timings))
            passes.append(timings.get("loss_backward_s", 0.0))
        loop = statistics.median(loops)
        # what holding `chunk` graphs adds: one backward through the forward graph per extra chunk
        extra = (math.ceil(size / chunk) - 1) * statistics.median(passes)
        rows.append(
            {
                "model": name,
                "batch": size,
                "method": "w-rebel (per-sample loop)",
                "step_s": loop,
                "ratio_to_base": loop / med["w-rebel"],  # against the batched W step it replaces
                "train_tokens_per_s": tokens / loop,
                "loop_chunk": chunk,
                "chunk_extra_s": extra,  # estimated; the official single pass is loop - extra
            }
        )
    return rows, trl_info


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

    steps, trl_info = bench_steps(cfg)
    steps = measured("steps", steps)
    duals = measured("duals", bench_duals(cfg))
    result = {
        "machine": machine(),
        "steps": steps,
        "trl": trl_info,
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


def trl_line(result: dict) -> str:
    """One line: bench's DPO step over TRL's per shape, or why the TRL arm was skipped."""
    info = result.get("trl") or {}
    if info.get("skipped"):
        return f"TRL DPOTrainer arm skipped: {info['skipped']}."
    ratios = [
        f"{r['model']} b{r['batch']} {r['bench_dpo_over_trl']:.2f}"
        for r in result["steps"]
        if r["method"] == TRL_ARM
    ]
    checks = info.get("loss_check", [])
    gap = max((abs(c["bench"] - c["trl"]) for c in checks), default=float("nan"))
    off = min((abs(c["bench"] - math.log(2)) for c in checks), default=float("nan"))
    return (
        f"bench dpo step / TRL {info.get('version', '?')} DPOTrainer step (same batch, paired rounds): "
        + ", ".join(ratios)
        + f"; their DPO losses on the batch after the rounds (the same weights; at least {off:.1e} from"
        f" log 2, the loss at the reference) differ by at most {gap:.1e}."
    )


def loop_line(result: dict) -> str:
    """How the per-sample W loop was run: samples per chunk and the estimated cost of chunking."""
    rows = [r for r in result["steps"] if r["method"] == "w-rebel (per-sample loop)"]
    if not rows:
        return "Per-sample W loop not run at these shapes."
    parts = [
        f"{r['model']} b{r['batch']}: {r['loop_chunk']} samples' graphs at a time, "
        f"~{r['chunk_extra_s']:.2f} s of extra backward passes in its {r['step_s']:.2f} s"
        for r in rows
    ]
    return "Per-sample W loop (exact, chunked to bound memory): " + "; ".join(parts) + "."


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
        trl_line(result),
        "",
        loop_line(result),
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
