"""Preference datasets for reward models (the reward-based half of DRO-RLHF, arXiv 2503.00539).

A ``PreferenceTask`` holds training pairs (text of the first and second response, the label that
the first is preferred) and named evaluation sets: in distribution (the training labeler on held-out
prompts) and out of distribution (other labelers or other datasets). A reward model is scored by
pairwise accuracy per set and by the worst case over the OOD sets.

* ``lexicon-prefs`` (offline): responses sampled from the lexicon task's policy preset; training
  labels from one mixture of the lexicon heads, OOD sets labeled by other objectives.
* ``unified-feedback``: llm-blender/Unified-Feedback pairs (``conv_A``/``conv_B`` with ratings),
  OOD on Anthropic/hh-rlhf pairs and any further datasets named in the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.core.lm import Sampling, sample
from bench.core.refcache import cached, model_fingerprint
from tasks.hub import load_splits
from tasks.lexicon import presets, rewards
from tasks.lexicon.prompts import splits
from tasks.mixtures import mix_rewards
from tasks.registry import TaskSpec, register_task


@dataclass
class PairSet:
    first: list[str]  # prompt + response texts
    second: list[str]
    label: torch.Tensor  # P(first preferred), 0/1


@dataclass
class PreferenceTask:
    train: PairSet
    val: dict[str, PairSet]
    test: dict[str, PairSet]
    rm_base: str
    id_set: str = "id"


@dataclass
class LexiconPrefsConfig:
    policy: str = "tiny"  # the preset whose samples are labeled (and the reward model's base)
    pretrain_steps: int = 0
    n: int = 200  # training prompts: the data scale
    n_val: int = 40
    n_test: int = 60
    pairs_per_prompt: int = 4
    seen: list[str] = field(default_factory=lambda: ["joy", "trust"])
    alpha0: float = 0.5
    ood: list[str] = field(default_factory=lambda: ["sadness", "anger", "fear", "vader"])
    max_new_tokens: int = 16

    def validate(self) -> None:
        bad = [h for h in (*self.seen, *self.ood) if h not in rewards.HEADS]
        if bad or len(self.seen) != 2 or not self.ood:
            raise ValueError(
                f"task.seen (two) and task.ood name lexicon heads {', '.join(rewards.HEADS)}; bad: {bad}"
            )


def _labeled(prompts: list[str], texts: list[str], heads: torch.Tensor, weights: torch.Tensor) -> PairSet:
    """Pairs labeled by the mixture ``weights``; ties (often: no word of either objective) are dropped,
    since their label would be noise."""
    r = mix_rewards(heads, weights)
    keep = (r[:, 0] != r[:, 1]).tolist()
    first = [p + t for p, t, k in zip(prompts, texts[0::2], keep, strict=True) if k]
    second = [p + t for p, t, k in zip(prompts, texts[1::2], keep, strict=True) if k]
    return PairSet(first, second, (r[:, 0] > r[:, 1]).double()[torch.tensor(keep, dtype=torch.bool)])


def build_lexicon_prefs(cfg: LexiconPrefsConfig) -> PreferenceTask:
    cfg.validate()
    parts = splits(cfg.n_val, cfg.n_test)
    names = list(rewards.HEADS)
    model, tok = presets.load_policy(cfg.policy, cfg.pretrain_steps)
    sampling = Sampling(cfg.max_new_tokens)

    def responses(split: str, n: int) -> tuple[list[str], list[str], torch.Tensor]:
        """``pairs_per_prompt`` pairs per prompt: 2k samples, consecutive ones paired."""
        prompts = [p.text for p in parts[split][:n]]
        torch.manual_seed({"train": 1, "val": 2, "test": 3}[split])
        texts = sample(model, tok, prompts, 2 * cfg.pairs_per_prompt, sampling).texts
        repeated = [p for p in prompts for _ in range(cfg.pairs_per_prompt)]
        return repeated, texts, rewards.score(texts).view(len(repeated), 2, -1)

    spec = {
        "kind": "lexicon-prefs",
        "policy": cfg.policy,
        "steps": cfg.pretrain_steps,
        "n": cfg.n,
        "n_val": cfg.n_val,
        "n_test": cfg.n_test,
        "tokens": cfg.max_new_tokens,
        "pairs": cfg.pairs_per_prompt,
    }
    data = cached(
        spec,
        model_fingerprint(model),
        lambda: {s: responses(s, n) for s, n in (("train", cfg.n), ("val", cfg.n_val), ("test", cfg.n_test))},
    )

    def onehot(k: str) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(names.index(k)), len(names)).double()

    train_w = cfg.alpha0 * onehot(cfg.seen[0]) + (1 - cfg.alpha0) * onehot(cfg.seen[1])
    sets = {"id": train_w} | {f"ood:{k}": onehot(k) for k in cfg.ood}
    return PreferenceTask(
        train=_labeled(*data["train"], train_w),
        val={name: _labeled(*data["val"], w) for name, w in sets.items()},
        test={name: _labeled(*data["test"], w) for name, w in sets.items()},
        rm_base=str(presets.ensure_preset(cfg.policy, cfg.pretrain_steps)),
    )


@dataclass
class UnifiedFeedbackConfig:
    dataset: str = "llm-blender/Unified-Feedback"  # or a local folder of train/val.jsonl
    subset: str = "all"
    rm_base: str = "gpt2"
    ood: dict[str, str] = field(default_factory=lambda: {"hh-rlhf": "Anthropic/hh-rlhf"})  # name -> dataset
    n: int = 20000
    n_val: int = 1000
    n_test: int = 1000

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError("task.n must be >= 1")


def _conversation(turns: list[dict]) -> str:
    return "".join(f"\n\n{t['role'].capitalize()}: {t['content']}" for t in turns)


def _unified_pairs(rows: list[dict]) -> PairSet:
    rows = [r for r in rows if r["conv_A_rating"] != r["conv_B_rating"]]
    return PairSet(
        [_conversation(r["conv_A"]) for r in rows],
        [_conversation(r["conv_B"]) for r in rows],
        torch.tensor([float(r["conv_A_rating"] > r["conv_B_rating"]) for r in rows], dtype=torch.float64),
    )


def _chosen_rejected(rows: list[dict]) -> PairSet:
    """Pairs with the chosen response first (HH-RLHF's layout); label 1."""
    return PairSet(
        [r["chosen"] for r in rows], [r["rejected"] for r in rows], torch.ones(len(rows), dtype=torch.float64)
    )


def build_unified_feedback(cfg: UnifiedFeedbackConfig) -> PreferenceTask:
    cfg.validate()
    rows = load_splits(cfg.dataset, {"train": "train", "val": "val"}, config=cfg.subset)
    held = _unified_pairs(rows["val"])
    half = len(held.first) // 2

    def cut(p: PairSet, lo: int, hi: int) -> PairSet:
        return PairSet(p.first[lo:hi], p.second[lo:hi], p.label[lo:hi])

    test = {"id": cut(held, 0, min(half, cfg.n_test))}
    val = {"id": cut(held, half, half + cfg.n_val)}
    for name, dataset in cfg.ood.items():
        ood = _chosen_rejected(load_splits(dataset, {"test": "test"})["test"])
        test[f"ood:{name}"] = cut(ood, 0, cfg.n_test)
        val[f"ood:{name}"] = cut(ood, cfg.n_test, cfg.n_test + cfg.n_val)
    return PreferenceTask(cut(_unified_pairs(rows["train"]), 0, cfg.n), val, test, cfg.rm_base)


RM_LOSSES = frozenset({"bt"})  # the reward-model tasks train Bradley-Terry models
register_task(
    TaskSpec(
        name="lexicon-prefs",
        config_cls=LexiconPrefsConfig,
        builder=build_lexicon_prefs,
        trainer="rm",
        needs="nothing: offline, CPU (pairs sampled once from the lexicon preset, cached)",
        description="reward models on lexicon-labeled pairs; ID = training mixture, OOD = other objectives",
        defaults=("train.iterations=100", "train.batch_size=32", "train.lr=5e-4", "train.eval_every=25"),
        losses=RM_LOSSES,
        scale_key="task.n",
    )
)
register_task(
    TaskSpec(
        name="unified-feedback",
        config_cls=UnifiedFeedbackConfig,
        builder=build_unified_feedback,
        trainer="rm",
        needs="llm-blender/Unified-Feedback and Anthropic/hh-rlhf (Hub); a GPU for real base models",
        description="reward models on Unified-Feedback; OOD accuracy on HH-RLHF pairs (and datasets you add)",
        defaults=("train.iterations=2000", "train.batch_size=64", "train.lr=1e-5", "train.eval_every=500"),
        losses=RM_LOSSES,
        scale_key="task.n",
        size_key="task.rm_base",
    )
)
