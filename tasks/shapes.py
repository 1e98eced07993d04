"""Published configs (sizes only) of the model families the tasks use, so that ``bench plan`` can
size a cell without downloading anything; a local model folder is read from its ``config.json``.

The numbers are those of each model's ``config.json`` on the Hub (GPT-2, Pythia, Llama-3.2
Instruct, Llama-3 8B as the ArmoRM backbone, SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.registry import ModelSpec

GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}
PYTHIA = {"model_type": "gpt_neox", "vocab_size": 50304, "rotary_pct": 0.25, "tie_word_embeddings": False}
LLAMA3 = {
    "model_type": "llama",
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}

PUBLISHED = {
    "gpt2": {**GPT2, "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {**GPT2, "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {**GPT2, "n_layer": 36, "n_embd": 1280, "n_head": 20},
    "EleutherAI/pythia-160m": {
        **PYTHIA,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "EleutherAI/pythia-410m": {
        **PYTHIA,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "EleutherAI/pythia-1b": {
        **PYTHIA,
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 8,
        "intermediate_size": 8192,
    },
    "EleutherAI/pythia-2.8b": {
        **PYTHIA,
        "hidden_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 10240,
    },
    "meta-llama/Llama-3.2-1B-Instruct": {
        **LLAMA3,
        "max_position_embeddings": 131072,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.2-3B-Instruct": {
        **LLAMA3,
        "max_position_embeddings": 131072,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": {
        **LLAMA3,
        "max_position_embeddings": 8192,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
}
# The reward models of the HH task are GPT-2-large sequence classifiers.
PUBLISHED["Ray2333/gpt2-large-helpful-reward_model"] = PUBLISHED["gpt2-large"]
PUBLISHED["Ray2333/gpt2-large-harmless-reward_model"] = PUBLISHED["gpt2-large"]


def config_of(name: str) -> dict:
    """The published config of ``name``, or a local folder's ``config.json``; a clear error else."""
    if name in PUBLISHED:
        return dict(PUBLISHED[name])
    path = Path(name) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    raise ValueError(
        f"no published shape for model {name!r} and no {path}: bench plan knows {', '.join(PUBLISHED)}, "
        "or give a local model folder"
    )


def policy_and_reference(name: str) -> list[ModelSpec]:
    """The trained policy and its frozen reference copy, both of model ``name``."""
    config = config_of(name)
    return [ModelSpec("policy", config, name), ModelSpec("reference", config, name)]
