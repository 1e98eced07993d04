"""Anthropic HH alignment: HH-RLHF prompts (the first human turn), drawn evenly from the configured
subsets, GPT-2 / Pythia policies after an SFT step on the chosen dialogues, and a panel of a
helpfulness and a harmlessness reward model from the Hub (configurable ids), mixed with ``alpha0``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
# Anthropic/hh-rlhf's preference subsets (data_dir folders); red-team-attempts has another layout
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


@dataclass
class HHConfig:
    size: str = "pythia-160m"  # a preset name or a local model folder
    dataset: str = "Anthropic/hh-rlhf"  # or a local folder: <subset>/train|test.jsonl (chosen/rejected)
    subsets: list[str] = field(default_factory=lambda: list(SUBSETS))  # prompts drawn evenly from each
    data_seed: int = 0  # the order in which each subset's prompts are drawn
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
        bad = [s for s in self.subsets if s not in SUBSETS]
        if bad or not self.subsets or len(set(self.subsets)) < len(self.subsets):
            raise ValueError(
                f"task.subsets: distinct names among {', '.join(SUBSETS)}; bad: {bad or self.subsets}"
            )


def first_turn(dialogue: str) -> str:
    """``Human: <first human turn>\\n\\nAssistant:`` from an HH dialogue."""
    human = dialogue.split("\n\nHuman:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
    return f"Human: {human}\n\nAssistant:"


def subset_dirs(cfg: HHConfig) -> list[str | None]:
    """Each subset's ``data_dir``; a local folder without subset folders is one subset."""
    local = Path(cfg.dataset)
    flat = local.is_dir() and not any((local / s).is_dir() for s in cfg.subsets)
    return [None] if flat else list(cfg.subsets)


def artifacts(cfg: HHConfig):
    keys = ("dataset", "sft_epochs", "sft_lr", "prep_batch", "prep_max_len", "prep_examples")
    spec = {k: v for k, v in asdict(cfg).items() if k in keys} | {"policy": SIZES.get(cfg.size, cfg.size)}
    if list(cfg.subsets) != list(SUBSETS):  # all four are the rows SFT read before subsets were set
        spec["subsets"] = list(cfg.subsets)
    return artifact_dir("hh", spec)


def prepare(cfg: HHConfig) -> str:
    """SFT of the policy on the chosen dialogues of the subsets (cached)."""
    rows = [
        r for d in subset_dirs(cfg) for r in load_splits(cfg.dataset, {"train": "train"}, data_dir=d)["train"]
    ]
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


def subset_prompts(cfg: HHConfig) -> dict[str, list[list[str]]]:
    """``{split: [each subset's distinct first turns]}`` for train and test, each list shuffled with
    ``data_seed`` (per subset, so adding a subset leaves the others' order alone)."""
    out: dict[str, list[list[str]]] = {"train": [], "test": []}
    for d in subset_dirs(cfg):
        rows = load_splits(cfg.dataset, {"train": "train", "test": "test"}, data_dir=d)
        for split, lists in out.items():
            prompts = list(dict.fromkeys(first_turn(r["chosen"]) for r in rows[split]))
            random.Random(f"{cfg.data_seed}:{d}:{split}").shuffle(prompts)
            lists.append(prompts)
    return out


def round_robin(lists: list[list[str]], skip: frozenset[str] = frozenset()) -> list[str]:
    """One new prompt from each list in turn: a list passes over the prompts already drawn (or in
    ``skip``) to its next one, and drops out when it runs out."""
    seen, out = set(skip), []
    queues = [iter(prompts) for prompts in lists]
    while queues:
        for queue in list(queues):
            prompt = next((p for p in queue if p not in seen), None)
            if prompt is None:
                queues.remove(queue)
            else:
                seen.add(prompt)
                out.append(prompt)
    return out


def numbered(texts: list[str], n: int, what: str) -> list[Prompt]:
    return take([Prompt(t, 0, i) for i, t in enumerate(texts)], n, what)


def prompt_splits(cfg: HHConfig) -> dict[str, list[Prompt]]:
    """Train prompts from the train files; test and val from alternate prompts of each subset's test
    file, so both are drawn evenly and share no prompt; every split without duplicates."""
    drawn = subset_prompts(cfg)
    test = round_robin([h[0::2] for h in drawn["test"]])
    val = round_robin([h[1::2] for h in drawn["test"]], skip=frozenset(test))
    return {
        "train": numbered(round_robin(drawn["train"]), cfg.n, "task.n"),
        "val": numbered(val, cfg.n_val, "task.n_val"),
        "test": numbered(test, cfg.n_test, "task.n_test"),
    }


def build(cfg: HHConfig) -> PromptTask:
    cfg.validate()
    folder = require(artifacts(cfg), "hh")
    splits = prompt_splits(cfg)
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
