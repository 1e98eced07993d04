"""Anthropic HH alignment: HH-RLHF prompts (the first human turn), GPT-2 / Pythia policies after an
SFT step on the chosen dialogues, and a panel of a helpfulness and a harmlessness reward model
from the Hub (configurable ids), mixed with ``alpha0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.core.artifacts import artifact_dir, build_once, require
from bench.core.lm import Sampling
from tasks.finetune import finetune_lm
from tasks.hub import PAPER_DEFAULTS, PromptTask, SequenceClassifierPanel, StackedPanel, load_splits, take
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import pair_protocol
from tasks.registry import ModelSpec, TaskSpec, register_task
from tasks.shapes import config_of, policy_and_reference

SIZES = {
    "gpt2": "gpt2",
    "pythia-160m": "EleutherAI/pythia-160m",
    "pythia-410m": "EleutherAI/pythia-410m",
    "pythia-1b": "EleutherAI/pythia-1b",
    "pythia-2.8b": "EleutherAI/pythia-2.8b",
}
TEMPLATE = "\n\n{prompt}{response}"


@dataclass
class HHConfig:
    size: str = "pythia-160m"  # a preset name or a local model folder
    dataset: str = "Anthropic/hh-rlhf"  # or a local folder of train/test.jsonl with chosen/rejected
    helpful_rm: str = "Ray2333/gpt2-large-helpful-reward_model"
    harmless_rm: str = "Ray2333/gpt2-large-harmless-reward_model"
    n: int = 1024
    n_val: int = 64
    n_test: int = 128
    alpha0: float = 0.5  # alpha0·helpful + (1 - alpha0)·harmless
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    sft_epochs: int = 1
    sft_lr: float = 1e-5
    prep_batch: int = 8
    prep_max_len: int = 256
    prep_examples: int = 0

    def validate(self) -> None:
        if not 0 <= self.alpha0 <= 1:
            raise ValueError(f"task.alpha0 must lie in [0, 1], got {self.alpha0}")


def first_turn(dialogue: str) -> str:
    """``Human: <first human turn>\\n\\nAssistant:`` from an HH dialogue."""
    human = dialogue.split("\n\nHuman:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
    return f"Human: {human}\n\nAssistant:"


def artifacts(cfg: HHConfig):
    keys = ("dataset", "sft_epochs", "sft_lr", "prep_batch", "prep_max_len", "prep_examples")
    return artifact_dir(
        "hh", {k: v for k, v in asdict(cfg).items() if k in keys} | {"policy": SIZES.get(cfg.size, cfg.size)}
    )


def prepare(cfg: HHConfig) -> str:
    """SFT of the policy on the chosen dialogues (cached)."""
    rows = load_splits(cfg.dataset, {"train": "train"})["train"]
    if cfg.prep_examples:
        rows = rows[: cfg.prep_examples]
    texts = [r["chosen"].strip() for r in rows]

    def build(out):
        finetune_lm(
            SIZES.get(cfg.size, cfg.size),
            texts,
            out / "policy",
            epochs=cfg.sft_epochs,
            lr=cfg.sft_lr,
            batch=cfg.prep_batch,
            max_len=cfg.prep_max_len,
        )

    return str(build_once(artifacts(cfg), build))


def build(cfg: HHConfig) -> PromptTask:
    cfg.validate()
    folder = require(artifacts(cfg), "hh")
    rows = load_splits(cfg.dataset, {"train": "train", "test": "test"})
    train = [Prompt(first_turn(r["chosen"]), 0, i) for i, r in enumerate(rows["train"])]
    held = [Prompt(first_turn(r["chosen"]), 0, i) for i, r in enumerate(rows["test"])]
    splits = {
        "train": take(train, cfg.n, "task.n"),
        "val": take(held[1::2], cfg.n_val, "task.n_val"),
        "test": take(held[0::2], cfg.n_test, "task.n_test"),
    }
    panel = StackedPanel(
        [
            SequenceClassifierPanel(
                cfg.helpful_rm, ["helpful"], transform="identity", text="dialogue", template=TEMPLATE
            ),
            SequenceClassifierPanel(
                cfg.harmless_rm, ["harmless"], transform="identity", text="dialogue", template=TEMPLATE
            ),
        ]
    )
    protocol = pair_protocol(["helpful", "harmless"], (0, 1), cfg.alpha0)
    return PromptTask(
        splits,
        panel,
        protocol,
        Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p),
        str(folder / "policy"),
    )


register_task(
    TaskSpec(
        name="hh",
        config_cls=HHConfig,
        builder=build,
        trainer="lm",
        needs="Anthropic/hh-rlhf, Pythia/GPT-2, helpful + harmless RMs (Hub); `bench prepare hh`; a GPU",
        description="HH-RLHF first human turns; SFT Pythia/GPT-2; helpful and harmless reward models",
        defaults=(*PAPER_DEFAULTS, "method.eta=0.01", "method.beta=0.1"),
        size_key="task.size",
        preparer=prepare,
        gpus=1,
        models=lambda cfg: [
            *policy_and_reference(SIZES.get(cfg.size, cfg.size)),
            *(
                ModelSpec("reward", config_of(rm) | {"num_labels": 1}, rm)
                for rm in (cfg.helpful_rm, cfg.harmless_rm)
            ),
        ],
    )
)
