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
    DRO_REBEL_DEFAULTS,
    DRO_REBEL_SETTINGS,
    PromptTask,
    ScoreCache,
    from_pretrained,
    load_splits,
    reward_device,
    shuffled,
    take,
)
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import pair_protocol
from tasks.registry import ModelSpec, PaperProtocol, Setting, TaskSpec, register_task
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
    dataset: str = "HuggingFaceH4/helpsteer2"  # or a local folder of <split>.jsonl files
    train_split: str = "train"  # the training pool (first n) and validation prompts (last n_val)
    test_split: str = "test"
    data_seed: int = 1234  # pools drawn by random.Random(data_seed) (test: data_seed + 1)
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
    chat_template: bool = False  # the policy prompt in the policy's chat template (off: raw text)
    standardize: bool = False  # true: heads standardized against the reference (bench's option)
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 1024  # a prompt's first tokens kept
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 50  # the code passes none: transformers' default 50 applies
    generate_batch: int = 16  # prompts per generate() call (the code: one); bounds the KV cache

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


PROMPT_FIELDS = ("prompt", "instruction", "question", "text")  # the first present (the code's rule)


def prompt_field(row: dict) -> str:
    """The prompt column of a HelpSteer2 row: the first of ``PROMPT_FIELDS`` that it has."""
    for name in PROMPT_FIELDS:
        if name in row:
            return name
    raise ValueError(f"no prompt column in the dataset's rows: none of {PROMPT_FIELDS} in {sorted(row)}")


def build(cfg: ArmoRMConfig) -> PromptTask:
    cfg.validate()
    rows = load_splits(cfg.dataset, {"train": cfg.train_split, "test": cfg.test_split})
    policy = policy_id(cfg)
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, policy, "policy tokenizer") if cfg.chat_template else None
    raw: dict[str, str] = {}

    armorm = ArmoRMPanel(cfg)
    too_long: list[str] = []

    def unique_prompts(items: list[dict]) -> list[str]:
        """The split's distinct prompts in file order (HelpSteer2 has several responses per prompt),
        without those ArmoRM's window cannot hold."""
        seen, out = set(), []
        for r in items:
            text = r[prompt_field(r)]
            if text in seen:
                continue
            seen.add(text)
            (out if armorm.fits(text) else too_long).append(text)
        return out

    def as_prompts(texts: list[str]) -> list[Prompt]:
        out = []
        for text in texts:
            shown = text
            if tok is not None:
                chat = [{"role": "user", "content": text}]
                shown = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            raw[shown] = text
            out.append(Prompt(shown, 0, len(out)))
        return out

    train = shuffled(unique_prompts(rows["train"]), cfg.data_seed)
    if cfg.n + cfg.n_val > len(train):
        raise ValueError(
            f"task.n + task.n_val = {cfg.n + cfg.n_val} exceeds the {len(train)} prompts of {cfg.train_split}"
        )
    test = shuffled(unique_prompts(rows["test"]), cfg.data_seed + 1)
    splits = {
        "train": as_prompts(train[: cfg.n]),
        "val": as_prompts(train[len(train) - cfg.n_val :]),
        "test": take(as_prompts(test), cfg.n_test, "task.n_test"),
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
        Sampling(
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            top_k=cfg.top_k,
            max_prompt_tokens=cfg.max_prompt_tokens,
            batch_size=cfg.generate_batch,
        ),
        policy,
        standardize=cfg.standardize,
    )


def armorm_models(cfg: ArmoRMConfig) -> list[ModelSpec]:
    """What a cell holds, by published shape (no download): the Llama-3.2 Instruct policy and its frozen
    reference, and ArmoRM (a Llama-3-8B backbone with 19 objective heads and the gating MLP)."""
    reward = {**HEAD_DEFAULTS, "rms_norm_eps": 1e-5} | config_of(cfg.reward_model)
    return [
        *policy_and_reference(policy_id(cfg)),
        ModelSpec("reward", reward | {"num_labels": len(HEADS) - 1}, cfg.reward_model),
    ]


CODE = "github.com/sharansahu/distributionally_robust_rebel@f2cb0ce"
RUNNER = "experiments/run_armorm_alignment.py"
PROTOCOL = PaperProtocol(
    "dro-rebel-armorm",
    f"the DRO-REBEL code, {CODE}, {RUNNER} (Sahu & Wells, arXiv 2509.19104)",
    (
        Setting("policy", "Llama-3.2-1B-Instruct", f"{RUNNER}:309", "task.size", value="1b"),
        Setting("prompts", "HuggingFaceH4/helpsteer2", f"{RUNNER}:310", "task.dataset"),
        Setting("training split", "train", f"{RUNNER}:259", "task.train_split"),
        Setting("test split", "test", f"{RUNNER}:260", "task.test_split"),
        Setting("pools drawn with random.Random", "1234", f"{RUNNER}:115, 230-231", "task.data_seed"),
        Setting("training prompt pool", "512", f"{RUNNER}:230", "task.n"),
        Setting("test prompts", "128", f"{RUNNER}:231", "task.n_test"),
        Setting(
            "validation prompts",
            "none",
            RUNNER,
            "task.n_val",
            departs="the last n_val of the shuffled training split, disjoint from the pool, for tuning",
        ),
        Setting(
            "policy chat template",
            "false (tokenizer.encode)",
            f"{RUNNER}:101-102",
            "task.chat_template",
            value="false",
        ),
        Setting("prompt tokens kept", "1024", f"{RUNNER}:39", "task.max_prompt_tokens"),
        Setting("new tokens", "1024", f"{RUNNER}:40-42", "task.max_new_tokens"),
        Setting("temperature", "0.7", f"{RUNNER}:40-42", "task.temperature"),
        Setting("top-p", "1", f"{RUNNER}:40-42", "task.top_p"),
        Setting(
            "top-k", "50 (not passed: transformers' default)", f"{RUNNER}:104-108", "task.top_k", value="50"
        ),
        Setting(
            "scorer",
            "RLHFlow/ArmoRM-Llama3-8B-v0.1, bf16",
            f"{RUNNER}:49-57",
            "task.reward_model",
            value=ARMORM,
        ),
        Setting("scorer tokens", "1024", f"{RUNNER}:73-79, 342", "task.reward_max_length"),
        Setting(
            "scorer input",
            "[user, assistant] chat template, right-truncated, no attention mask",
            f"{RUNNER}:73-82",
            departs="padding masked; prompts whose template alone overflows the window are left out "
            "(truncation would cut the assistant turn ArmoRM's gate reads)",
            bench="[user, assistant] chat template, right-truncated, masked",
        ),
        Setting(
            "seen objectives", "helpsteer-helpfulness, helpsteer-correctness", f"{RUNNER}:317", "task.seen"
        ),
        Setting("alpha0", "0.15 (README: 0.1)", f"{RUNNER}:238, 329", "task.alpha0", value="0.15"),
        Setting(
            "evaluation objectives",
            "helpsteer-helpfulness, helpsteer-correctness, helpsteer-coherence, "
            "ultrafeedback-truthfulness, ArmoRM",
            f"{RUNNER}:318",
            "task.evaluate",
        ),
        Setting(
            "rewards standardized",
            "false (raw head values)",
            f"{RUNNER}:138-143",
            "task.standardize",
            value="false",
        ),
        Setting("DPO labels", "argmax (r1 >= r2)", f"{RUNNER}:184", "method.labels", "dpo", value="argmax"),
        Setting("iterations", "200", f"{RUNNER}:322", "train.iterations"),
        Setting("prompts per iteration", "32", f"{RUNNER}:323", "train.batch_size"),
        Setting("learning rate", "1e-05", f"{RUNNER}:150", "train.lr"),
        *DRO_REBEL_SETTINGS,
        Setting("REBEL eta", "0.01", f"{RUNNER}:326", "method.eta"),
        Setting("DPO beta", "1", f"{RUNNER}:151-153", "method.beta", "dpo"),
        Setting("W radius rho0 (W-REBEL, WDPO)", "0.5", f"{RUNNER}:327", "method.rho0", "w-rebel"),
        Setting("KL tau", "0.1", f"{RUNNER}:328", "method.tau", "kl-rebel"),
        Setting("chi-square rho (= rho0)", "0.5", f"{RUNNER}:157", "method.rho", "chi2-rebel"),
        Setting("evaluation every", "50", f"{RUNNER}:241", "train.eval_every"),
        Setting(
            "seed",
            "1234",
            f"{RUNNER}:44-45",
            departs="every stream seeded from the config",
            bench="the config's seed",
        ),
    ),
)


register_task(
    TaskSpec(
        name="armorm",
        config_cls=ArmoRMConfig,
        builder=build,
        trainer="lm",
        needs="nvidia/HelpSteer2, Llama-3.2-1B/3B-Instruct (gated), ArmoRM-Llama3-8B weights; a GPU",
        description="HelpSteer2 prompts; Llama-3.2 Instruct; ArmoRM 19 objectives + MoE score",
        defaults=(
            *DRO_REBEL_DEFAULTS,
            "train.batch_size=32",
            "train.iterations=200",
            "method.eta=0.01",
            "method.beta=1.0",
            "method.labels=argmax",
            "method.tau=0.1",
            "wasserstein:method.rho0=0.5",
            "chi2:method.rho=0.5",  # the code passes rho0 as the chi-square radius
            # 1B policy + reference + the 8B scorer on one 80 GB GPU (see `bench plan --task armorm`)
            "train.grad_checkpointing=true",
            "train.micro_batch=2",
        ),
        size_key="task.size",
        gpus=1,
        models=armorm_models,
        protocol=PROTOCOL,
    )
)
