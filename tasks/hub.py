"""Shared machinery of the Hub-backed paper tasks (emotion, armorm, hh).

* loading datasets and models through ``datasets`` / ``from_pretrained``, or from a local path (the
  tests' stand-ins), failing at once with what to download and how when the Hub is unreachable;
* reward panels: K named heads scored in batches (``score(prompts, responses) -> [N, K]``);
* ``PromptTask``: the interface the training loop uses (prompt splits, panel, mixture protocol,
  sampling settings, policy preset).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.core.lm import Sampling
from tasks.lexicon.prompts import Prompt
from tasks.mixtures import Protocol


class HubUnavailable(RuntimeError):
    """A dataset or model the task needs could not be loaded; the message says how to get it."""


def _offline_hint() -> str:
    flags = [f for f in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(f) == "1"]
    return f" ({', '.join(flags)} is set)" if flags else ""


def load_splits(name: str, splits: dict[str, str], config: str | None = None) -> dict[str, list[dict]]:
    """``{our split: rows}`` from a Hub dataset, or from ``NAME/<split>.jsonl`` files when ``name``
    is a local folder. Offline or unreachable: ``HubUnavailable`` naming the download command.
    """
    from datasets import load_dataset

    local = Path(name)
    try:
        if local.is_dir():
            files = {ours: str(local / f"{theirs}.jsonl") for ours, theirs in splits.items()}
            ds = load_dataset("json", data_files=files)
            return {ours: list(ds[ours]) for ours in splits}
        ds = load_dataset(name, config) if config else load_dataset(name)
        return {ours: list(ds[theirs]) for ours, theirs in splits.items()}
    except (ConnectionError, OSError, ValueError) as err:
        raise HubUnavailable(
            f"dataset {name} is not available{_offline_hint()}: with network, run "
            f"`huggingface-cli download --repo-type dataset {name}` (or let `datasets` fetch it once) and "
            f"keep HF_HOME on the nodes; or set the task's dataset to a local folder of <split>.jsonl files. "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def from_pretrained(loader, model_id: str, what: str, **kwargs):
    """``loader.from_pretrained`` with an actionable error when the weights cannot be had."""
    try:
        return loader.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise HubUnavailable(
            f"{what} {model_id} is not available{_offline_hint()}: with network, run "
            f"`huggingface-cli download {model_id}` (gated models need `huggingface-cli login` and an "
            f"accepted licence), or point the task at a local copy. ({str(err).splitlines()[0]})"
        ) from None


def load_causal_lm(model_id: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = from_pretrained(AutoTokenizer, model_id, "tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return from_pretrained(AutoModelForCausalLM, model_id, "policy model", dtype=dtype), tok


def reward_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SequenceClassifierPanel:
    """Heads from one sequence classifier: ``transform(logits)`` per head (sigmoid or identity).

    ``text`` chooses what is scored: ``response`` (the emotion classifier reads the response only)
    or ``dialogue`` (prompt and response joined as ``template``).
    """

    def __init__(
        self,
        model_id: str,
        names: list[str],
        *,
        transform: str = "sigmoid",
        text: str = "response",
        template: str = "{prompt}{response}",
        batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
        max_length: int = 512,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.names, self.transform, self.text, self.template = list(names), transform, text, template
        self.batch_size, self.max_length = batch_size, max_length
        self.tok = from_pretrained(AutoTokenizer, model_id, "reward tokenizer")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = from_pretrained(
            AutoModelForSequenceClassification, model_id, "reward model", dtype=dtype
        )
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.model.to(reward_device()).eval()
        if self.model.config.num_labels < len(self.names):
            raise ValueError(
                f"reward model {model_id} has {self.model.config.num_labels} labels, "
                f"fewer than the {len(self.names)} heads {self.names}"
            )

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        texts = (
            responses
            if self.text == "response"
            else [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        )
        out = []
        device = next(self.model.parameters()).device
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[lo : lo + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(device)
            logits = self.model(**enc).logits.float()[:, : len(self.names)]
            out.append(torch.sigmoid(logits) if self.transform == "sigmoid" else logits)
        return torch.cat(out).double().cpu()


class StackedPanel:
    """Several single-output reward models, one head each (e.g. helpful and harmless)."""

    def __init__(self, panels: list[SequenceClassifierPanel]):
        self.panels = panels
        self.names = [p.names[0] for p in panels]

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        return torch.cat([p.score(prompts, responses) for p in self.panels], dim=1)


class ScoreCache:
    """A persistent ``(prompt, response) -> heads`` cache in front of a costly panel (ArmoRM)."""

    def __init__(self, panel, path: Path):
        self.panel, self.names, self.path = panel, panel.names, Path(path)
        self.table: dict[str, list[float]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                key, values = json.loads(line)
                self.table[key] = values

    @staticmethod
    def key(prompt: str, response: str) -> str:
        return hashlib.sha256(f"{prompt}\0{response}".encode()).hexdigest()

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        keys = [self.key(p, r) for p, r in zip(prompts, responses, strict=True)]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one scoring per distinct pair
        todo = sorted(i for k, i in first.items() if k not in self.table)
        if todo:
            fresh = self.panel.score([prompts[i] for i in todo], [responses[i] for i in todo])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for i, row in zip(todo, fresh.tolist(), strict=True):
                    self.table[keys[i]] = row
                    f.write(json.dumps([keys[i], row]) + "\n")
        return torch.tensor([self.table[k] for k in keys], dtype=torch.float64)


# The training defaults shared by the paper tasks (emotion, armorm, hh).
PAPER_DEFAULTS = (
    "train.iterations=100",
    "train.batch_size=64",
    "train.lr=1e-5",
    "train.eval_every=50",
    "train.checkpoint_every=10",
    "train.grad_clip=1.0",
    "train.warmup=10",
)


@dataclass
class PromptTask:
    """What the training loop needs from a task; the paper tasks build one from their config."""

    splits: dict[str, list[Prompt]]
    panel: object  # .names and .score(prompts, responses) -> [N, K]
    protocol: Protocol
    sampling: Sampling
    policy_id: str
    standardize: bool = True

    @property
    def names(self) -> list[str]:
        return list(self.panel.names)

    def prompts(self, split: str) -> list[Prompt]:
        return self.splits[split]

    def load_policy(self):
        return load_causal_lm(self.policy_id)

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        return self.panel.score(prompts, responses)


def take(rows: list[Prompt], n: int, what: str) -> list[Prompt]:
    if n > len(rows):
        raise ValueError(f"{what} = {n} exceeds the {len(rows)} prompts available")
    return rows[:n]
