"""Our implementation of the scoring of RLHFlow/ArmoRM-Llama3-8B-v0.1, loaded from its published
``config.json`` and safetensors by parameter name: no code downloaded with the checkpoint runs.

The published checkpoint (``LlamaForRewardModelWithGating``) holds, with K = ``num_objectives`` (19),
H = ``hidden_size`` (4096), d = ``gating_hidden_dim`` (1024), n = ``gating_n_hidden`` (3):

* ``model.*``: a Llama-3-8B backbone (``transformers.LlamaModel``, no LM head);
* ``regression_layer.weight`` [K, H]: the 19 objective heads, no bias;
* ``reward_transform_matrix`` [K, K]: the verbosity de-biasing applied before gating;
* ``gating.layers.{0..n}.{weight,bias}``: an MLP H -> d -> ... -> d -> K (ReLU between layers),
  and ``gating.logit_scale`` [1].

Scoring one [user: prompt, assistant: response] chat in the reward model's chat template, with final
hidden states h_t of its tokens:

    r = W h_{t_r}                                t_r = the last real (non-pad) token
    g = s * softmax(MLP(h_{t_g}) / tau)          t_g = start of the last occurrence of
                                                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"
    score = sum_k g_k (r M)_k                    (r a row vector, M = reward_transform_matrix)

``tau`` = ``gating_temperature`` (10) comes from the config, s = ``gating.logit_scale`` from the
weights. Every parameter runs in the dtype it is loaded in (the published usage loads all of them,
heads included, in bfloat16); outputs are returned as float32.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The token ids the published code hard-codes for its gating pattern: the Llama-3 tokenizer's encoding
# of GATING_TEXT (<|eot_id|>, <|start_header_id|>, "assistant", <|end_header_id|>, "\n\n").
GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
PUBLISHED_GATING_IDS = (128009, 128006, 78191, 128007, 271)
# config.json defaults of the published head (used when a field is absent, as the published code does)
HEAD_DEFAULTS = {
    "num_objectives": 19,
    "gating_temperature": 10,
    "gating_hidden_dim": 1024,
    "gating_n_hidden": 3,
}
WEIGHT_FILES = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]


class CheckpointMismatch(ValueError):
    """The safetensors do not hold exactly the tensors the published layout has."""


@dataclass
class ArmoRMOutput:
    rewards: Tensor  # [B, K] objective rewards r
    gating: Tensor  # [B, K] gate g (sums to s)
    score: Tensor  # [B] the gated score ("ArmoRM")


class GatingNetwork(nn.Module):
    """g(x) = s * softmax(MLP(x) / tau): ``n_hidden`` Linear+ReLU layers, then Linear to K."""

    def __init__(self, in_features: int, out_features: int, temperature: float, hidden: int, n_hidden: int):
        super().__init__()
        widths = [in_features] + [hidden] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        *hidden, last = self.layers
        for layer in hidden:
            x = torch.relu(layer(x))
        return F.softmax(last(x) / self.temperature, dim=-1) * self.logit_scale


class ArmoRMScorer(nn.Module):
    """The ArmoRM scoring module; parameter names are those of the published checkpoint."""

    def __init__(self, config: dict, gating_pattern: Sequence[int] = PUBLISHED_GATING_IDS):
        from transformers import LlamaConfig, LlamaModel

        super().__init__()
        head = {k: config.get(k, v) for k, v in HEAD_DEFAULTS.items()}
        k, hidden = int(head["num_objectives"]), int(config["hidden_size"])
        self.model = LlamaModel(LlamaConfig(**config))
        self.regression_layer = nn.Linear(hidden, k, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.zeros(k, k), requires_grad=False)
        self.gating = GatingNetwork(
            hidden,
            k,
            head["gating_temperature"],
            int(head["gating_hidden_dim"]),
            int(head["gating_n_hidden"]),
        )
        self.gating_pattern = [int(t) for t in gating_pattern]

    @property
    def num_objectives(self) -> int:
        return self.regression_layer.out_features

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> ArmoRMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.heads(hidden, input_ids, attention_mask)

    def heads(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> ArmoRMOutput:
        """Rewards, gate and score from the backbone's final hidden states [B, T, H]."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        rewards = self.regression_layer(hidden[rows, reward_positions(attention_mask).to(hidden.device)])
        gate = self.gating(hidden[rows, gating_positions(input_ids, self.gating_pattern).to(hidden.device)])
        score = (gate * (rewards @ self.reward_transform_matrix)).sum(-1)
        return ArmoRMOutput(rewards.float(), gate.float(), score.float())


def reward_positions(attention_mask: Tensor) -> Tensor:
    """t_r per row: the last attended token. The published code reads ``(first pad - 1) mod T``, the
    same token for right-padded rows whose text does not contain the pad id."""
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    pos = torch.where(attention_mask.bool(), idx, -1).max(1).values
    if (pos < 0).any():
        raise ValueError("a row of the batch has no attended token")
    return pos


def gating_positions(input_ids: Tensor, pattern: Sequence[int]) -> Tensor:
    """t_g per row: where the last occurrence of ``pattern`` (the start of the assistant turn) begins.
    As in the published code, a row without it is an error (e.g. truncated inside the prompt)."""
    n = len(pattern)
    if input_ids.shape[1] < n:
        raise ValueError(f"sequences of {input_ids.shape[1]} tokens cannot hold the gating pattern {pattern}")
    windows = input_ids.unfold(1, n, 1)  # [B, T - n + 1, n]
    hits = (windows == torch.as_tensor(pattern, device=input_ids.device)).all(-1)
    idx = torch.arange(hits.shape[1], device=input_ids.device)
    pos = torch.where(hits, idx, -1).max(1).values
    missing = (pos < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"the gating pattern {list(pattern)} (the start of the assistant turn) is not in rows {missing} "
            "of the batch: was the chat truncated inside the prompt?"
        )
    return pos


# ---- loading ---------------------------------------------------------------------------------------------


class _Snapshot:
    """A ``from_pretrained``-style loader of the config and weight files only (never *.py)."""

    @staticmethod
    def from_pretrained(name: str) -> Path:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=WEIGHT_FILES))
        except ValueError as err:  # not a Hub id (e.g. a local folder that does not exist)
            raise OSError(f"not a local folder and not a Hub repository id: {err}") from None


def checkpoint_folder(name: str | Path) -> Path:
    """A local folder as is; else the Hub snapshot of the config and weights (HubUnavailable offline)."""
    from tasks.hub import from_pretrained

    local = Path(name)
    return local if local.is_dir() else from_pretrained(_Snapshot, str(name), "ArmoRM checkpoint")


def weight_map(folder: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` from ``model.safetensors.index.json`` or ``model.safetensors``."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text())["weight_map"]
        files = {f: folder / f for f in set(names.values())}
        absent = sorted(f for f, p in files.items() if not p.exists())
        if absent:
            raise CheckpointMismatch(f"{index} names shards that are not in {folder}: {', '.join(absent)}")
        return {n: files[f] for n, f in names.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointMismatch(
            f"{folder} has neither model.safetensors nor model.safetensors.index.json (only safetensors "
            "weights are read)"
        )
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _listing(names: list[str], limit: int = 12) -> str:
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Path
) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{n} {list(found[n])} (expected {list(expected[n])})"
        for n in set(expected) & set(found)
        if tuple(found[n]) != tuple(expected[n])
    )
    problems = [
        f"missing tensors: {_listing(missing)}" if missing else "",
        f"unexpected tensors: {_listing(unexpected)}" if unexpected else "",
        f"shape mismatches: {_listing(shapes)}" if shapes else "",
    ]
    if any(problems):
        raise CheckpointMismatch(
            f"{where} does not match the ArmoRM layout of its config.json: "
            + "; ".join(p for p in problems if p)
        )


def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    out: dict[Path, list[str]] = {}
    for name, path in files.items():
        out.setdefault(path, []).append(name)
    return out


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    for path, names in _by_file(files).items():
        with safe_open(path, "pt") as f:
            present = set(f.keys())
            out.update({n: tuple(f.get_slice(n).get_shape()) for n in names if n in present})
    return out


def _read_state(files: dict[str, Path], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Each tensor read from its file, cast to ``dtype`` and moved to ``device`` one at a time."""
    from safetensors import safe_open

    state = {}
    for path, names in _by_file(files).items():
        with safe_open(path, "pt") as f:
            for name in names:
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return state


def load_armorm(
    name: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    gating_pattern: Sequence[int] = PUBLISHED_GATING_IDS,
) -> ArmoRMScorer:
    """The published ArmoRM (a local folder or a Hub id) as an ``ArmoRMScorer`` in ``dtype`` on
    ``device``, in eval mode. Every tensor is matched by name and shape to the layout its config.json
    implies; nothing else is read (no remote code)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    folder, device = checkpoint_folder(name), torch.device(device)
    if not (folder / "config.json").exists():
        raise CheckpointMismatch(f"{folder} has no config.json")
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = ArmoRMScorer(config, gating_pattern)
    files = weight_map(folder)
    check_tensors({n: tuple(t.shape) for n, t in model.state_dict().items()}, _shapes(files), folder)
    model.load_state_dict(_read_state(files, dtype, device), strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(model.model.config).to(device)  # a non-persistent buffer
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray:
        raise RuntimeError(f"ArmoRM tensors left unloaded: {_listing(stray)}")
    return model.requires_grad_(False).eval()
