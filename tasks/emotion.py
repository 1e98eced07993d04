"""Emotion alignment (DRO-REBEL and WDPO papers): dair-ai/emotion, GPT-2 policies, a GPT-2
emotion classifier as the reward panel (one sigmoid head per emotion).

``bench prepare emotion`` runs the paper pipeline once: SFT of the GPT-2 policy on the texts, and
a GPT-2 sequence classifier over the six labels; both are cached and reused by every run. Prompts
are the first ``prompt_words`` words of each text; training mixes two emotions with ``alpha0``
(convex or geometric); test mixtures sweep the alpha grid and the other emotions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bench.core.artifacts import artifact_dir, build_once, require
from bench.core.lm import Sampling
from tasks.finetune import finetune_lm, train_classifier
from tasks.hub import PAPER_DEFAULTS, PromptTask, SequenceClassifierPanel, load_splits, take
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import pair_protocol
from tasks.registry import ModelSpec, TaskSpec, register_task
from tasks.shapes import config_of, policy_and_reference

EMOTIONS = ("sadness", "joy", "love", "anger", "fear", "surprise")  # dair-ai/emotion label ids 0..5
SIZES = {"gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large"}


@dataclass
class EmotionConfig:
    size: str = "gpt2"  # gpt2 | gpt2-medium | gpt2-large, or a local model folder
    dataset: str = "dair-ai/emotion"  # or a local folder of train/validation/test.jsonl
    reward_base: str = "gpt2"  # base of the emotion classifier
    n: int = 1024  # training prompt pool ("data scale")
    n_val: int = 64
    n_test: int = 128
    prompt_words: int = 4
    seen: list[str] = field(default_factory=lambda: ["joy", "sadness"])
    alpha0: float = 0.5
    mixing: str = "convex"  # convex | geometric
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 0.95
    sft_epochs: int = 3
    sft_lr: float = 5e-5
    rm_epochs: int = 5
    rm_lr: float = 2e-5
    prep_batch: int = 8
    prep_max_len: int = 128
    prep_examples: int = 0  # 0: the whole training split

    def validate(self) -> None:
        bad = [s for s in self.seen if s not in EMOTIONS]
        if bad or len(self.seen) < 2:
            raise ValueError(f"task.seen needs two of {', '.join(EMOTIONS)}; got {list(self.seen)}")
        if self.mixing not in ("convex", "geometric") or self.prompt_words < 1:
            raise ValueError("task.mixing is convex|geometric and task.prompt_words >= 1")


def _policy_base(cfg: EmotionConfig) -> str:
    return SIZES.get(cfg.size, cfg.size)


def artifacts(cfg: EmotionConfig):
    keys = (
        "dataset",
        "reward_base",
        "sft_epochs",
        "sft_lr",
        "rm_epochs",
        "rm_lr",
        "prep_batch",
        "prep_max_len",
        "prep_examples",
    )
    spec = {k: v for k, v in asdict(cfg).items() if k in keys} | {"policy": _policy_base(cfg)}
    return artifact_dir("emotion", spec)


def prepare(cfg: EmotionConfig) -> str:
    """SFT the policy and train the classifier once (cached); returns the artifact folder."""
    cfg.validate()
    rows = load_splits(cfg.dataset, {"train": "train"})["train"]
    if cfg.prep_examples:
        rows = rows[: cfg.prep_examples]
    texts, labels = [r["text"] for r in rows], [int(r["label"]) for r in rows]
    common = {"batch": cfg.prep_batch, "max_len": cfg.prep_max_len}

    def build(out):
        finetune_lm(_policy_base(cfg), texts, out / "policy", epochs=cfg.sft_epochs, lr=cfg.sft_lr, **common)
        train_classifier(
            cfg.reward_base,
            texts,
            labels,
            len(EMOTIONS),
            out / "classifier",
            epochs=cfg.rm_epochs,
            lr=cfg.rm_lr,
            **common,
        )

    return str(build_once(artifacts(cfg), build))


def build(cfg: EmotionConfig) -> PromptTask:
    cfg.validate()
    folder = require(artifacts(cfg), "emotion")
    rows = load_splits(cfg.dataset, {"train": "train", "val": "validation", "test": "test"})

    def prompts(split: str) -> list[Prompt]:
        return [
            Prompt(" ".join(r["text"].split()[: cfg.prompt_words]), int(r["label"]), i)
            for i, r in enumerate(rows[split])
        ]

    splits = {
        "train": take(prompts("train"), cfg.n, "task.n"),
        "val": take(prompts("val"), cfg.n_val, "task.n_val"),
        "test": take(prompts("test"), cfg.n_test, "task.n_test"),
    }
    panel = SequenceClassifierPanel(
        str(folder / "classifier"), list(EMOTIONS), transform="sigmoid", text="response"
    )
    protocol = pair_protocol(
        list(EMOTIONS), tuple(EMOTIONS.index(s) for s in cfg.seen), cfg.alpha0, cfg.mixing
    )
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    return PromptTask(
        splits, panel, protocol, sampling, str(folder / "policy"), standardize=cfg.mixing == "convex"
    )


register_task(
    TaskSpec(
        name="emotion",
        config_cls=EmotionConfig,
        builder=build,
        trainer="lm",
        needs="dair-ai/emotion, gpt2[-medium|-large] (Hub or HF cache); `bench prepare emotion` once; a GPU",
        description="emotion texts' first words; SFT GPT-2 policy; GPT-2 emotion classifier (6 heads)",
        defaults=(*PAPER_DEFAULTS, "method.eta=0.01", "method.beta=0.1"),
        size_key="task.size",
        preparer=prepare,
        gpus=1,
        models=lambda cfg: [
            *policy_and_reference(_policy_base(cfg)),
            ModelSpec("reward", config_of(cfg.reward_base) | {"num_labels": len(EMOTIONS)}, cfg.reward_base),
        ],
    )
)
