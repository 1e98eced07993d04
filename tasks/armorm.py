"""ArmoRM multi-objective alignment: HelpSteer2 prompts, Llama-3.2 Instruct policies, and the 19
objective heads plus the MoE score of RLHFlow/ArmoRM-Llama3-8B-v0.1 as the reward panel.

ArmoRM runs custom modelling code from the Hub, so it loads only with the explicit opt-in
``task.trust_remote_code=true``. It is scored in bf16, in batches, on [user: prompt, assistant:
response] through its chat template, behind an optional persistent score cache. Training mixes a
random ordered pair of seen objectives per prompt with ``alpha0``; evaluation covers five
objectives with at least three unseen, plus the alpha grid of the seen pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.core.artifacts import cache_dir
from bench.core.lm import Sampling
from tasks.hub import (
    PAPER_DEFAULTS,
    PromptTask,
    ScoreCache,
    from_pretrained,
    load_splits,
    reward_device,
    take,
)
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import pair_protocol
from tasks.registry import TaskSpec, register_task

HEADS = (
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
    "ArmoRM",
)
SIZES = {"1b": "meta-llama/Llama-3.2-1B-Instruct", "3b": "meta-llama/Llama-3.2-3B-Instruct"}
ARMORM = "RLHFlow/ArmoRM-Llama3-8B-v0.1"


@dataclass
class ArmoRMConfig:
    size: str = "1b"  # 1b | 3b, or a local model folder
    dataset: str = "nvidia/HelpSteer2"  # or a local folder of train/validation.jsonl
    reward_model: str = ARMORM
    trust_remote_code: bool = False  # ArmoRM's modelling code comes from the Hub: opt in explicitly
    reward_dtype: str = "bfloat16"
    reward_batch: int = 8
    score_cache: bool = True
    n: int = 512
    n_val: int = 64
    n_test: int = 128
    seen: list[str] = field(default_factory=lambda: ["helpsteer-helpfulness", "helpsteer-correctness"])
    alpha0: float = 0.15
    evaluate: list[str] = field(
        default_factory=lambda: [
            "helpsteer-helpfulness",
            "helpsteer-correctness",
            "helpsteer-coherence",
            "ultrafeedback-truthfulness",
            "ArmoRM",
        ]
    )
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0

    def validate(self) -> None:
        bad = [h for h in (*self.seen, *self.evaluate) if h not in HEADS]
        if bad:
            raise ValueError(f"unknown ArmoRM objectives {bad}; known: {', '.join(HEADS)}")
        if len(self.seen) < 2:
            raise ValueError("task.seen needs at least two objectives")
        if len([h for h in self.evaluate if h not in self.seen]) < 3:
            raise ValueError(
                "task.evaluate needs at least 3 objectives unseen in training (preference shift)"
            )
        if self.reward_model == ARMORM and not self.trust_remote_code:
            raise ValueError(
                f"{ARMORM} runs custom code from the Hub: set task.trust_remote_code=true to allow it"
            )


class ArmoRMPanel:
    """19 objective rewards and the MoE score per (prompt, response); a plain classifier with 20
    labels (a test stand-in) is read from its logits."""

    def __init__(self, cfg: ArmoRMConfig):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.names = list(HEADS)
        kwargs = {"trust_remote_code": cfg.trust_remote_code}
        self.tok = from_pretrained(AutoTokenizer, cfg.reward_model, "ArmoRM tokenizer", **kwargs)
        dtype = getattr(torch, cfg.reward_dtype)
        self.model = (
            from_pretrained(
                AutoModelForSequenceClassification, cfg.reward_model, "ArmoRM", dtype=dtype, **kwargs
            )
            .to(reward_device())
            .eval()
        )
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch = cfg.reward_batch

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for lo in range(0, len(prompts), self.batch):
            chats = [
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                for p, r in zip(prompts[lo : lo + self.batch], responses[lo : lo + self.batch], strict=True)
            ]
            texts = [self.tok.apply_chat_template(c, tokenize=False) for c in chats]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            res = self.model(**enc)
            if hasattr(res, "rewards"):
                heads = torch.cat([res.rewards.float(), res.score.float().view(-1, 1)], dim=1)
            else:
                heads = res.logits.float()[:, : len(HEADS)]
            out.append(heads)
        return torch.cat(out).double().cpu()


def build(cfg: ArmoRMConfig) -> PromptTask:
    cfg.validate()
    rows = load_splits(cfg.dataset, {"train": "train", "validation": "validation"})
    policy = SIZES.get(cfg.size, cfg.size)
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, policy, "policy tokenizer")

    def prompts(items: list[dict]) -> list[Prompt]:
        seen, out = set(), []
        for r in items:
            if r["prompt"] in seen:  # HelpSteer2 has several responses per prompt
                continue
            seen.add(r["prompt"])
            chat = tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            out.append(Prompt(chat, 0, len(out)))
        return out

    held_out = prompts(rows["validation"])  # HelpSteer2 has no test split: halve its validation split
    splits = {
        "train": take(prompts(rows["train"]), cfg.n, "task.n"),
        "val": take(held_out[1::2], cfg.n_val, "task.n_val"),
        "test": take(held_out[0::2], cfg.n_test, "task.n_test"),
    }
    panel = ArmoRMPanel(cfg)
    if cfg.score_cache:
        name = cfg.reward_model.replace("/", "--")
        panel = ScoreCache(panel, cache_dir() / "armorm-scores" / f"{name}.jsonl")
    idx = {h: i for i, h in enumerate(HEADS)}
    protocol = pair_protocol(
        list(HEADS),
        tuple(idx[s] for s in cfg.seen),
        cfg.alpha0,
        random_pairs=True,
        evaluate=tuple(idx[e] for e in cfg.evaluate),
    )
    return PromptTask(
        splits, panel, protocol, Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p), policy
    )


register_task(
    TaskSpec(
        name="armorm",
        config_cls=ArmoRMConfig,
        builder=build,
        trainer="lm",
        needs="nvidia/HelpSteer2, Llama-3.2-1B/3B-Instruct (gated), ArmoRM-Llama3-8B (remote code); GPUs",
        description="HelpSteer2 prompts; Llama-3.2 Instruct; ArmoRM 19 objectives + MoE score",
        defaults=(
            *PAPER_DEFAULTS,
            "train.batch_size=32",
            "train.iterations=200",
            "method.eta=0.01",
            "method.beta=1.0",
            "method.labels=argmax",
        ),
        size_key="task.size",
    )
)
