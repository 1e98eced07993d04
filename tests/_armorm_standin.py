"""Tiny random stand-ins in the published layouts, for tests (no Hub):

* ``write_armorm`` - an ArmoRM checkpoint: config.json with the published field names, safetensors with
  the published tensor names (scaled down; backbone in bfloat16 and heads in float32), and a byte-level
  BPE tokenizer whose Llama-3 special tokens and chat template produce the gating pattern;
* ``write_policy`` - a tiny ``LlamaForCausalLM`` with a Llama-3.2-style chat template (a system block
  with a date, as the real template puts today's date there).
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import torch

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# The Llama-3 pre-tokenizer split (so "\n\n" before text is one token, as in the real tokenizer)
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The Llama-3 Instruct chat template (as shipped with ArmoRM's tokenizer)
LLAMA3_CHAT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-3.2 Instruct style: a system block carrying a date before the user turn
POLICY_CHAT = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: DATE\n\n<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = (
    "user assistant system what is the best way to learn a language? explain how tides work. "
    "write a short poem about the sea. summarize the text below in two sentences. hello there, "
    "thank you. sure, here is an answer: the moon pulls the water and the earth turns. 0123456789"
    "\n\nuser\n\nassistant\n\nsystem\n\nassistant\n\n"
)


def tokenizer(vocab: int = 320, chat_template: str = LLAMA3_CHAT, pad: bool = True):
    """A byte-level BPE tokenizer with the Llama-3 special tokens (``[PAD]`` too if ``pad``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + (["[PAD]"] if pad else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="[PAD]" if pad else None,
    )
    fast.chat_template = chat_template
    return fast


def backbone_config(vocab: int, **sizes) -> dict:
    """A config.json of a tiny Llama-3 backbone (the published field names)."""
    return {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        **sizes,
    }


def armorm_config(tok, gating_hidden_dim: int = 8, temperature: float = 10.0) -> dict:
    return {
        "architectures": ["LlamaForRewardModelWithGating"],
        "auto_map": {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
        **backbone_config(len(tok)),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "num_objectives": 19,
        "gating_temperature": temperature,
        "gating_hidden_dim": gating_hidden_dim,
        "gating_n_hidden": 3,
        "torch_dtype": "bfloat16",
    }


def armorm_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the published names: ``model.*`` from a random ``LlamaModel`` (bfloat16),
    the heads (float32) scaled so that the gate is far from uniform and M is far from symmetric."""
    from transformers import LlamaConfig, LlamaModel

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = LlamaModel(LlamaConfig(**config))
    out = {f"model.{n}": t.detach().to(torch.bfloat16) for n, t in backbone.state_dict().items()}
    k, h, d = config["num_objectives"], config["hidden_size"], config["gating_hidden_dim"]
    widths = [h] + [d] * config["gating_n_hidden"] + [k]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    out["regression_layer.weight"] = rand(k, h, scale=0.5)
    out["reward_transform_matrix"] = torch.eye(k) + torch.triu(rand(k, k, scale=0.3), diagonal=1)
    for i, (a, b) in enumerate(pairwise(widths)):
        out[f"gating.layers.{i}.weight"] = rand(b, a, scale=3.0 / a**0.5)
        out[f"gating.layers.{i}.bias"] = rand(b, scale=0.5)
    out["gating.logit_scale"] = torch.tensor([1.7])
    return out


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """``model.safetensors``, or ``shards`` files and ``model.safetensors.index.json`` as the Hub has them."""
    from safetensors.torch import save_file

    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_armorm(folder: Path, seed: int = 0, shards: int = 1, **config) -> Path:
    """A tiny ArmoRM checkpoint folder (config.json, safetensors, tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    cfg = armorm_config(tok, **config)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tensors(folder, armorm_tensors(cfg, seed), shards)
    tok.save_pretrained(folder)
    return folder


def write_policy(folder: Path, date: str = "01 Dec 2026", seed: int = 0) -> Path:
    """A tiny random ``LlamaForCausalLM`` whose chat template puts ``date`` in a system block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = tokenizer(chat_template=POLICY_CHAT.replace("DATE", date), pad=False)
    cfg = backbone_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
