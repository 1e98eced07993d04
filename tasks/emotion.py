"""Emotion alignment (DRO-REBEL and WDPO papers): dair-ai/emotion, GPT-2 policies, a GPT-2
emotion classifier as the reward panel (one sigmoid head per emotion).

``bench prepare emotion`` runs the paper pipeline once: SFT of the GPT-2 policy on the texts, and
a GPT-2 sequence classifier over the six labels; both are cached and reused by every run. The
defaults follow the DRO-REBEL code (``PROTOCOL``, shown by ``bench protocols``): prompts are whole
texts, responses are sampled with top-k 50, top-p 0.95, T 0.7 up to 128 tokens of prompt and
response, rewards are the classifier's raw sigmoid probabilities, mixed from two emotions with
``alpha0`` (convex or geometric); test mixtures sweep the alpha grid and the other emotions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bench.core.artifacts import artifact_dir, build_once, require
from bench.core.lm import Sampling
from tasks.finetune import finetune_lm, train_classifier
from tasks.hub import (
    DRO_REBEL_DEFAULTS,
    DRO_REBEL_SETTINGS,
    PromptTask,
    SequenceClassifierPanel,
    load_splits,
    take,
)
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import pair_protocol
from tasks.registry import ModelSpec, PaperProtocol, Setting, TaskSpec, register_task
from tasks.shapes import config_of, policy_and_reference

EMOTIONS = ("sadness", "joy", "love", "anger", "fear", "surprise")  # dair-ai/emotion label ids 0..5
SIZES = {"gpt2": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large"}


@dataclass
class EmotionConfig:
    size: str = "gpt2"  # gpt2 | gpt2-medium | gpt2-large, or a local model folder
    dataset: str = "dair-ai/emotion"  # or a local folder of train/validation/test.jsonl
    reward_base: str = "gpt2"  # base of the emotion classifier
    n: int = 16000  # training prompt pool ("data scale"); 16000: the whole train split
    n_val: int = 64
    n_test: int = 128
    prompt_words: int = 0  # 0: the whole text (the DRO-REBEL code); k: its first k words (Xu et al.)
    seen: list[str] = field(default_factory=lambda: ["joy", "sadness"])
    alpha0: float = 0.5
    mixing: str = "convex"  # convex | geometric
    standardize: bool = False  # true: heads standardized against the reference (bench's option)
    max_new_tokens: int = 128
    max_total_tokens: int = 128  # prompt + response, as generate(max_length=128); 0: no total cap
    max_prompt_tokens: int = 128  # a prompt's first tokens kept (the code encodes with max_length)
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
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
        if self.mixing not in ("convex", "geometric") or self.prompt_words < 0:
            raise ValueError("task.mixing is convex|geometric and task.prompt_words >= 0 (0: whole text)")


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
        words = cfg.prompt_words or None
        return [
            Prompt(" ".join(r["text"].split()[:words]), int(r["label"]), i) for i, r in enumerate(rows[split])
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
    sampling = Sampling(
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        top_k=cfg.top_k,
        max_total_tokens=cfg.max_total_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
    )
    standardize = cfg.standardize and cfg.mixing == "convex"  # geometric mixes need the raw [0, 1] heads
    return PromptTask(splits, panel, protocol, sampling, str(folder / "policy"), standardize=standardize)


CODE = "github.com/sharansahu/distributionally_robust_rebel@f2cb0ce"
RUNNER = "experiments/run_emotion_rebel_experiments.py"
DATA = "src/datasets/emotion-alignment.py"
PROTOCOL = PaperProtocol(
    "dro-rebel-emotion",
    f"the DRO-REBEL code, {CODE} (Sahu & Wells, arXiv 2509.19104)",
    (
        Setting("policy", "gpt2 after SFT", "config.py", "task.size", value="gpt2"),
        Setting("prompt words (0: the whole text)", "0", f"{DATA}:131", "task.prompt_words"),
        Setting("prompt tokens kept", "128", f"{DATA}:24", "task.max_prompt_tokens"),
        Setting("prompt + response tokens", "128", f"{DATA}:25-35 (max_length)", "task.max_total_tokens"),
        Setting("temperature", "0.7", f"{DATA}:25-35", "task.temperature"),
        Setting("top-p", "0.95", f"{DATA}:25-35", "task.top_p"),
        Setting("top-k", "50", f"{DATA}:25-35", "task.top_k"),
        Setting("seen emotions (r1, r2)", "joy, sadness", "config.py:27-28", "task.seen"),
        Setting("alpha0", "0.5", "config.py:25", "task.alpha0"),
        Setting("mixing", "convex", "config.py:26", "task.mixing"),
        Setting(
            "rewards standardized",
            "false (raw sigmoid probabilities)",
            f"{DATA}:92",
            "task.standardize",
            value="false",
        ),
        Setting("DPO labels", "bernoulli", f"{DATA}:157-162", "method.labels", "dpo"),
        Setting("iterations", "100", "config.py:22", "train.iterations"),
        Setting("prompts per iteration", "128", "config.py:23", "train.batch_size"),
        Setting("training prompt pool", "16000 (the train split)", f"{DATA}:130", "task.n", value="16000"),
        Setting("optimizer", "adamw", "src/models/rebel_optimizers.py:144", "train.optimizer"),
        Setting("learning rate", "1e-05", "config.py:24", "train.lr"),
        *DRO_REBEL_SETTINGS,
        Setting("REBEL eta", "0.01", f"{RUNNER}:266", "method.eta"),
        Setting("DPO beta", "0.1", "config.py:36", "method.beta", "dpo"),
        Setting("W radius rho0", "0.01", f"{RUNNER}:133", "method.rho0", "w-rebel"),
        Setting("KL tau", "0.1", "config.py:31-33", "method.tau", "kl-rebel"),
        Setting("chi-square rho", "0.01", "config.py:31-33", "method.rho", "chi2-rebel"),
        Setting("anchor", "fixed_ref (the SFT model)", f"{RUNNER}:251", "method.anchor", value="fixed_ref"),
        Setting("evaluation every", "50", f"{RUNNER}:106-108", "train.eval_every"),
        Setting(
            "test prompts",
            "64 random, 1 sample each, scored on the training mixture only",
            f"{RUNNER}:67-79",
            "task.n_test",
            departs="fixed test prompts scored on every held-out mixture (the worst case), more of them",
        ),
        Setting(
            "seed",
            "none set",
            RUNNER,
            departs="every stream seeded from the config",
            bench="the config's seed",
        ),
        Setting("SFT epochs", "3", "config.py:12", "task.sft_epochs"),
        Setting("SFT learning rate", "5e-05", "config.py:13", "task.sft_lr"),
        Setting("classifier epochs (6 labels)", "5", "config.py:17", "task.rm_epochs"),
        Setting("classifier learning rate", "2e-05", "config.py:18", "task.rm_lr"),
        Setting("SFT and classifier batch", "8", "config.py:8", "task.prep_batch"),
        Setting("SFT and classifier tokens", "128", "config.py:9", "task.prep_max_len"),
    ),
)


register_task(
    TaskSpec(
        name="emotion",
        config_cls=EmotionConfig,
        builder=build,
        trainer="lm",
        needs="dair-ai/emotion, gpt2[-medium|-large] (Hub or HF cache); `bench prepare emotion` once; a GPU",
        description="emotion texts; SFT GPT-2 policy; GPT-2 emotion classifier (6 heads), DRO-REBEL protocol",
        defaults=(
            *DRO_REBEL_DEFAULTS,
            "train.iterations=100",
            "train.batch_size=128",
            "method.eta=0.01",
            "method.beta=0.1",
            "method.labels=bernoulli",
        ),
        protocol=PROTOCOL,
        size_key="task.size",
        preparer=prepare,
        gpus=1,
        models=lambda cfg: [
            *policy_and_reference(_policy_base(cfg)),
            ModelSpec("reward", config_of(cfg.reward_base) | {"num_labels": len(EMOTIONS)}, cfg.reward_base),
        ],
    )
)
