"""Preference datasets for reward models (the reward-based half of DRO-RLHF, arXiv 2503.00539).

A ``PreferenceTask`` holds training pairs (the shared prompt, the first and second response, the
label that the first is preferred) and named evaluation sets: in distribution (the training labeler
on held-out prompts) and out of distribution (other labelers or other datasets). A reward model
reads the prompt's end and the whole response in ``task.max_length`` tokens, and is scored by
pairwise accuracy per set and by the worst case over the OOD sets.

* ``lexicon-prefs`` (offline): responses sampled from the lexicon task's policy preset; training
  labels from one mixture of the lexicon heads, OOD sets labeled by other objectives.
* ``unified-feedback``: llm-blender/Unified-Feedback pairs (``conv_A``/``conv_B`` with ratings),
  OOD on the sets of the Generalizable Reward Model paper (arXiv 2406.10216), HHH-Alignment and
  MT-Bench human judgements; none of Unified-Feedback's own sources may serve as OOD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.core.lm import Sampling, sample
from bench.core.refcache import cached, model_fingerprint
from tasks.hub import load_splits
from tasks.lexicon import presets, rewards
from tasks.lexicon.prompts import splits
from tasks.mixtures import mix_rewards
from tasks.registry import TaskSpec, register_task
from tasks.reward_model import MAX_LENGTH


@dataclass
class PairSet:
    """Two responses to one prompt per pair; the reward model reads prompt + response."""

    prompt: list[str]
    first: list[str]
    second: list[str]
    label: torch.Tensor  # P(first preferred), 0/1

    def __len__(self) -> int:
        return len(self.first)

    def rows(self, idx: list[int]) -> PairSet:
        return PairSet(
            [self.prompt[i] for i in idx],
            [self.first[i] for i in idx],
            [self.second[i] for i in idx],
            self.label[idx],
        )

    def cut(self, lo: int, hi: int) -> PairSet:
        return self.rows(list(range(len(self)))[lo:hi])


@dataclass
class PreferenceTask:
    train: PairSet
    val: dict[str, PairSet]
    test: dict[str, PairSet]
    rm_base: str
    id_set: str = "id"
    max_length: int = MAX_LENGTH  # tokens the reward model reads per prompt + response


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
    max_length: int = MAX_LENGTH  # tokens the reward model reads per prompt + response

    def validate(self) -> None:
        bad = [h for h in (*self.seen, *self.ood) if h not in rewards.HEADS]
        if bad or len(self.seen) != 2 or not self.ood:
            raise ValueError(
                f"task.seen (two) and task.ood name lexicon heads {', '.join(rewards.HEADS)}; bad: {bad}"
            )
        if self.max_length < 1:
            raise ValueError("task.max_length must be >= 1")


def _labeled(prompts: list[str], texts: list[str], heads: torch.Tensor, weights: torch.Tensor) -> PairSet:
    """Pairs labeled by the mixture ``weights``; ties (often: no word of either objective) are dropped,
    since their label would be noise."""
    r = mix_rewards(heads, weights)
    pairs = PairSet(prompts, texts[0::2], texts[1::2], (r[:, 0] > r[:, 1]).double())
    return pairs.rows([i for i, tie in enumerate((r[:, 0] == r[:, 1]).tolist()) if not tie])


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
        max_length=cfg.max_length,
    )


UNIFIED_FEEDBACK = "llm-blender/Unified-Feedback"
# Unified-Feedback's sources, which cannot be out of its distribution. Its dataset card (README on the
# Hub, as of its Jan 2024 revision) lists openai/summarize_from_feedback, openai/webgpt_comparisons,
# Dahoas/instruct-synthetic-prompt-responses, Anthropic/hh-rlhf, lmsys/chatbot_arena_conversations,
# openbmb/UltraFeedback, argilla/ultrafeedback-binarized-preferences-cleaned and berkeley-nest/Nectar;
# its subsets today are these sources' names (Nectar, UltraFeedback, chatbot_arena_conversations,
# hh-rlhf, summarize_from_feedback, synthetic-instruct-gptj-pairwise,
# ultrafeedback-binarized-preferences-cleaned, webgpt_comparisons) plus `all`. The
# synthetic-instruct-gptj-pairwise subset is Dahoas/synthetic-instruct-gptj-pairwise by name, so both
# Dahoas ids are listed. Neither HHH-Alignment nor MT-Bench is among them.
UNIFIED_FEEDBACK_SOURCES = frozenset(
    {
        "anthropic/hh-rlhf",
        "argilla/ultrafeedback-binarized-preferences-cleaned",
        "berkeley-nest/nectar",
        "dahoas/instruct-synthetic-prompt-responses",
        "dahoas/synthetic-instruct-gptj-pairwise",
        "lmsys/chatbot_arena_conversations",
        "openai/summarize_from_feedback",
        "openai/webgpt_comparisons",
        "openbmb/ultrafeedback",
    }
)
HHH_CONFIGS = ("harmless", "helpful", "honest", "other")


@dataclass
class UnifiedFeedbackConfig:
    dataset: str = UNIFIED_FEEDBACK  # or a local folder of train/val.jsonl
    subset: str = "all"
    rm_base: str = "gpt2"
    # name -> dataset (a key of OOD_LOADERS): GRM's OOD sets (arXiv 2406.10216)
    ood: dict[str, str] = field(
        default_factory=lambda: {
            "hhh-alignment": "HuggingFaceH4/hhh_alignment",
            "mt-bench": "lmsys/mt_bench_human_judgments",
        }
    )
    n: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    # 1024 as in GRM's evaluation scripts (max_length=1024; Mandal et al.'s setup reportedly too, not
    # verified here): most Unified-Feedback prompts and responses stay whole
    max_length: int = 1024

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError("task.n must be >= 1")
        if self.max_length < 1:
            raise ValueError("task.max_length must be >= 1")
        for name, dataset in self.ood.items():
            if dataset.lower() in UNIFIED_FEEDBACK_SOURCES:
                raise ValueError(
                    f"task.ood: {name} = {dataset} is one of {UNIFIED_FEEDBACK}'s sources, "
                    "so it is not out of distribution"
                )
            if dataset not in OOD_LOADERS:
                raise ValueError(
                    f"task.ood: {name} = {dataset} has no loader; known: {', '.join(OOD_LOADERS)}"
                )


def _conversation(turns: list[dict]) -> str:
    return "".join(f"\n\n{t['role'].capitalize()}: {t['content']}" for t in turns)


def _shared_turns(a: list[dict], b: list[dict]) -> int:
    """How many leading turns both conversations share, up to and including the last shared user turn."""
    shared = 0
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # the shorter one ends the prefix
        if (x["role"], x["content"]) != (y["role"], y["content"]):
            break
        if x["role"] == "user":
            shared = i + 1
    return shared


def _split_conversations(a: list[dict], b: list[dict]) -> tuple[str, str, str]:
    """``(prompt, first, second)``: the prompt is the turns both conversations share (``_shared_turns``;
    all turns but the last assistant turn when the two differ only there), each response the rest."""
    k = _shared_turns(a, b)
    return _conversation(a[:k]), _conversation(a[k:]), _conversation(b[k:])


def _pair_set(triples: list[tuple[str, str, str]], labels: list[float]) -> PairSet:
    return PairSet(
        [t[0] for t in triples],
        [t[1] for t in triples],
        [t[2] for t in triples],
        torch.tensor(labels, dtype=torch.float64),
    )


def _unified_pairs(rows: list[dict]) -> PairSet:
    """Unified-Feedback rows (``conv_A``/``conv_B``, ratings); ties dropped."""
    rows = [r for r in rows if r["conv_A_rating"] != r["conv_B_rating"]]
    return _pair_set(
        [_split_conversations(r["conv_A"], r["conv_B"]) for r in rows],
        [float(r["conv_A_rating"] > r["conv_B_rating"]) for r in rows],
    )


def _hhh_pairs(rows: list[dict]) -> PairSet:
    """HHH-Alignment rows (``input``, ``targets: {choices, labels}``): the input is the user's turn
    (a dialogue's ``Human:`` turns become user turns), the best-labeled choice first, label 1."""
    triples = []
    for r in rows:
        choices, labels = r["targets"]["choices"], r["targets"]["labels"]
        prompt = _conversation([{"role": "user", "content": r["input"].strip()}])
        best, worst = choices[labels.index(max(labels))], choices[labels.index(min(labels))]
        triples.append(
            (
                prompt.replace("\n\nHuman:", "\n\nUser:"),
                _conversation([{"role": "assistant", "content": best}]),
                _conversation([{"role": "assistant", "content": worst}]),
            )
        )
    return _pair_set(triples, [1.0] * len(triples))


def _mt_bench_pairs(rows: list[dict]) -> PairSet:
    """MT-Bench human judgements (``conversation_a``/``_b``, ``winner``, ``turn``): each conversation
    up to the judged turn (its first ``2 * turn`` messages); ties dropped; label 1 when model_a won."""
    rows = [r for r in rows if r["winner"] in ("model_a", "model_b")]
    return _pair_set(
        [
            _split_conversations(r["conversation_a"][: 2 * r["turn"]], r["conversation_b"][: 2 * r["turn"]])
            for r in rows
        ],
        [float(r["winner"] == "model_a") for r in rows],
    )


def _load_hhh(dataset: str) -> PairSet:
    """HHH-Alignment: its four configs' ``test`` splits (all it has), as GRM evaluates it."""
    return _hhh_pairs([r for c in HHH_CONFIGS for r in load_splits(dataset, {"test": "test"}, c)["test"]])


def _load_mt_bench(dataset: str) -> PairSet:
    """MT-Bench: the ``human`` split (the ``gpt4_pair`` split holds GPT-4's judgements)."""
    return _mt_bench_pairs(load_splits(dataset, {"human": "human"})["human"])


OOD_LOADERS: dict[str, Callable[[str], PairSet]] = {
    "HuggingFaceH4/hhh_alignment": _load_hhh,
    "lmsys/mt_bench_human_judgments": _load_mt_bench,
}


def _by_prompt(pairs: PairSet) -> tuple[PairSet, PairSet]:
    """Two halves that share no prompt: distinct prompts alternate between them, in order of first
    appearance (an OOD set's test and validation parts)."""
    side = {p: i % 2 for i, p in enumerate(dict.fromkeys(pairs.prompt))}
    halves = ([i for i, p in enumerate(pairs.prompt) if side[p] == h] for h in (0, 1))
    return tuple(pairs.rows(idx) for idx in halves)


def build_unified_feedback(cfg: UnifiedFeedbackConfig) -> PreferenceTask:
    cfg.validate()
    rows = load_splits(cfg.dataset, {"train": "train", "val": "val"}, config=cfg.subset)
    held = _unified_pairs(rows["val"])
    half = len(held) // 2
    test = {"id": held.cut(0, min(half, cfg.n_test))}
    val = {"id": held.cut(half, half + cfg.n_val)}
    for name, dataset in cfg.ood.items():
        test_part, val_part = _by_prompt(OOD_LOADERS[dataset](dataset))
        test[f"ood:{name}"] = test_part.cut(0, cfg.n_test)
        val[f"ood:{name}"] = val_part.cut(0, cfg.n_val)
    train = _unified_pairs(rows["train"]).cut(0, cfg.n)
    return PreferenceTask(train, val, test, cfg.rm_base, max_length=cfg.max_length)


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
        needs="llm-blender/Unified-Feedback and the task.ood datasets (Hub); a GPU for real base models",
        description="reward models on Unified-Feedback; OOD accuracy on HHH-Alignment and MT-Bench (GRM's)",
        defaults=("train.iterations=2000", "train.batch_size=64", "train.lr=1e-5", "train.eval_every=500"),
        losses=RM_LOSSES,
        scale_key="task.n",
        size_key="task.rm_base",
    )
)
