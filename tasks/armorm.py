"""ArmoRM multi-objective alignment: HelpSteer2 prompts, Llama-3.2 Instruct policies, and the 19
objective heads plus the MoE score of RLHFlow/ArmoRM-Llama3-8B-v0.1 as the reward panel.

ArmoRM is scored by our own implementation of its published model (``tasks.armorm_model``): its
config.json and safetensors are read by parameter name and no code from the Hub runs. Its modelling
code can still be used as an explicit alternative, ``task.trust_remote_code=true``.

The reward model sees the raw HelpSteer2 prompt, not the policy's templated prompt (BOS, a system block
with today's date, an assistant header): the panel maps each policy prompt back to its raw text, so
scores and the score cache do not depend on the policy template or the calendar. Each (prompt,
response) is scored as [user: prompt, assistant: response] in ArmoRM's chat template, in bf16, in
chunks of ``reward_batch``, right-padded and right-truncated to ``reward_max_length`` tokens (as the
DRO-REBEL scorer does), behind an optional persistent score cache. Training mixes a random ordered pair
of seen objectives per prompt with ``alpha0``; evaluation covers five objectives with at least three
unseen, plus the alpha grid of the seen pair.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.core.artifacts import cache_dir
from bench.core.lm import Sampling
from tasks.armorm_model import GATING_TEXT, HEAD_DEFAULTS, PUBLISHED_GATING_IDS, load_armorm
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
from tasks.registry import ModelSpec, TaskSpec, register_task
from tasks.shapes import config_of, policy_and_reference

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
    size: str = "1b"  # 1b | 3b (any case), or a local model folder
    dataset: str = "nvidia/HelpSteer2"  # or a local folder of train/validation.jsonl
    reward_model: str = ARMORM  # a Hub id or a local folder in the published ArmoRM layout
    trust_remote_code: bool = False  # true: run ArmoRM's own modelling code from the Hub instead
    reward_dtype: str = "bfloat16"
    reward_batch: int = 8
    reward_max_length: int = 1024  # tokens of [user, assistant] kept (right truncation)
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
        if self.reward_batch < 1 or self.reward_max_length < 8:
            raise ValueError("task.reward_batch must be >= 1 and task.reward_max_length >= 8")


def policy_id(cfg: ArmoRMConfig) -> str:
    """The policy preset's Hub id (``1b``/``3b`` in any case), or ``task.size`` itself (a folder)."""
    return SIZES.get(cfg.size.lower(), cfg.size)


class ArmoRMPanel:
    """The 19 objective rewards and the gated score of ArmoRM per (raw prompt, response)."""

    def __init__(self, cfg: ArmoRMConfig):
        from transformers import AutoTokenizer

        self.names = list(HEADS)
        self.batch, self.max_length = cfg.reward_batch, cfg.reward_max_length
        self.tok = from_pretrained(AutoTokenizer, cfg.reward_model, "ArmoRM tokenizer")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.pattern = self.tok.encode(GATING_TEXT, add_special_tokens=False)
        if cfg.reward_model == ARMORM and tuple(self.pattern) != PUBLISHED_GATING_IDS:
            raise ValueError(
                f"the {ARMORM} tokenizer encodes the gating pattern as {self.pattern}, not as the "
                f"published {list(PUBLISHED_GATING_IDS)}"
            )
        dtype = getattr(torch, cfg.reward_dtype)
        self.model = (
            self._remote(cfg, dtype)
            if cfg.trust_remote_code
            else load_armorm(cfg.reward_model, dtype, reward_device(), self.pattern)
        )

    def _remote(self, cfg: ArmoRMConfig, dtype: torch.dtype):
        """ArmoRM's own modelling code from the Hub (explicit opt-in)."""
        from transformers import AutoModelForSequenceClassification

        model = from_pretrained(
            AutoModelForSequenceClassification,
            cfg.reward_model,
            "ArmoRM",
            dtype=dtype,
            trust_remote_code=True,
        )
        model.config.pad_token_id = self.tok.pad_token_id
        return model.to(reward_device()).eval()

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, Tensor]:
        """[user: prompt, assistant: response] in ArmoRM's chat template, right-padded and truncated."""
        chats = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(prompts, responses, strict=True)
        ]
        texts = [self.tok.apply_chat_template(c, tokenize=False) for c in chats]
        return self.tok(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            add_special_tokens=False,  # the template has the BOS
        )

    def fits(self, prompt: str) -> bool:
        """Whether ``prompt`` in ArmoRM's chat template fits ``task.reward_max_length`` tokens: a longer
        one would lose, to truncation, the assistant turn that ArmoRM's gate reads."""
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        return len(self.tok.apply_chat_template(chat, tokenize=True, return_dict=False)) <= self.max_length

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """[N, 20]: the 19 rewards and the gated score, float64 on the CPU."""
        device = next(self.model.parameters()).device
        out = []
        for lo in range(0, len(prompts), self.batch):
            enc = self.encode(prompts[lo : lo + self.batch], responses[lo : lo + self.batch]).to(device)
            res = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(torch.cat([res.rewards.float(), res.score.float().view(-1, 1)], dim=1))
        return torch.cat(out).double().cpu()


class RawPromptPanel:
    """The reward panel of the raw prompts: each policy-templated prompt text is mapped back to its raw
    HelpSteer2 text before scoring (and before the score cache keys on it)."""

    def __init__(self, panel, raw: dict[str, str]):
        self.panel, self.names = panel, panel.names
        self.raw = raw | {r: r for r in raw.values()}  # the raw prompts themselves are accepted too

    def raw_prompt(self, text: str) -> str:
        try:
            return self.raw[text]
        except KeyError:
            raise KeyError(
                f"prompt not from this task's splits (no raw HelpSteer2 prompt): {text[:80]!r}"
            ) from None

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        return self.panel.score([self.raw_prompt(p) for p in prompts], responses)


def cache_name(cfg: ArmoRMConfig) -> str:
    """The score file: one per reward model and scoring setting (dtype, window, implementation)."""
    impl = "remote" if cfg.trust_remote_code else "native"
    name = cfg.reward_model.strip("/").replace("/", "--")
    return f"{name}--{impl}-{cfg.reward_dtype}-L{cfg.reward_max_length}-raw.jsonl"


def build(cfg: ArmoRMConfig) -> PromptTask:
    cfg.validate()
    rows = load_splits(cfg.dataset, {"train": "train", "validation": "validation"})
    policy = policy_id(cfg)
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, policy, "policy tokenizer")
    raw: dict[str, str] = {}

    armorm = ArmoRMPanel(cfg)
    too_long: list[str] = []

    def prompts(items: list[dict]) -> list[Prompt]:
        seen, out = set(), []
        for r in items:
            if r["prompt"] in seen:  # HelpSteer2 has several responses per prompt
                continue
            seen.add(r["prompt"])
            if not armorm.fits(r["prompt"]):
                too_long.append(r["prompt"])
                continue
            chat = tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            raw[chat] = r["prompt"]
            out.append(Prompt(chat, 0, len(out)))
        return out

    held_out = prompts(rows["validation"])  # HelpSteer2 has no test split: halve its validation split
    splits = {
        "train": take(prompts(rows["train"]), cfg.n, "task.n"),
        "val": take(held_out[1::2], cfg.n_val, "task.n_val"),
        "test": take(held_out[0::2], cfg.n_test, "task.n_test"),
    }
    if too_long:
        warnings.warn(
            f"armorm: {len(too_long)} prompts longer than task.reward_max_length={cfg.reward_max_length} "
            "tokens in ArmoRM's chat template were left out (their gate position would be truncated away)",
            stacklevel=2,
        )
    panel = ScoreCache(armorm, cache_dir() / "armorm-scores" / cache_name(cfg)) if cfg.score_cache else armorm
    idx = {h: i for i, h in enumerate(HEADS)}
    protocol = pair_protocol(
        list(HEADS),
        tuple(idx[s] for s in cfg.seen),
        cfg.alpha0,
        random_pairs=True,
        evaluate=tuple(idx[e] for e in cfg.evaluate),
    )
    return PromptTask(
        splits,
        RawPromptPanel(panel, raw),
        protocol,
        Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p),
        policy,
    )


def armorm_models(cfg: ArmoRMConfig) -> list[ModelSpec]:
    """What a cell holds, by published shape (no download): the Llama-3.2 Instruct policy and its frozen
    reference, and ArmoRM (a Llama-3-8B backbone with 19 objective heads and the gating MLP)."""
    reward = {**HEAD_DEFAULTS, "rms_norm_eps": 1e-5} | config_of(cfg.reward_model)
    return [
        *policy_and_reference(policy_id(cfg)),
        ModelSpec("reward", reward | {"num_labels": len(HEADS) - 1}, cfg.reward_model),
    ]


register_task(
    TaskSpec(
        name="armorm",
        config_cls=ArmoRMConfig,
        builder=build,
        trainer="lm",
        needs="nvidia/HelpSteer2, Llama-3.2-1B/3B-Instruct (gated), ArmoRM-Llama3-8B weights; a GPU",
        description="HelpSteer2 prompts; Llama-3.2 Instruct; ArmoRM 19 objectives + MoE score",
        defaults=(
            *PAPER_DEFAULTS,
            "train.batch_size=32",
            "train.iterations=200",
            "method.eta=0.01",
            "method.beta=1.0",
            "method.labels=argmax",
            # 1B policy + reference + the 8B scorer on one 80 GB GPU (see `bench plan --task armorm`)
            "train.grad_checkpointing=true",
            "train.micro_batch=8",
        ),
        size_key="task.size",
        gpus=1,
        models=armorm_models,
    )
)
