"""Generation backends (bench.core.generation): the hf reference, the factory, and the vLLM
backend's pure parts (sampling parameters, seeds, weight names and dtypes) on CPU, without vLLM.

The only fake here is ``FakeEngine``: it stands in for ``vllm.LLM`` in the colocate backend and
records what the backend sends it (weights through ``collective_rpc``, the sleep/wake calls, the
prompts and sampling parameters of ``generate``). Its ``generate`` returns made-up token ids; what
is tested is what goes in and how the reply is laid out, not vLLM's sampling. The real engine gets
``vllm.SamplingParams(**kwargs)`` where the fake gets the plain ``kwargs`` dict.
"""

from __future__ import annotations

import copy
import importlib.util
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.core import lm
from bench.core.generation import (
    NOT_WEIGHTS,
    VLLM_MISSING,
    Generator,
    GeneratorUnavailable,
    HFGenerator,
    VLLMGenerator,
    check_generator,
    chunks,
    draw_seed,
    engine_weights,
    make_generator,
    preserved_rng,
    request_seeds,
    vllm_sampling_kwargs,
    vllm_weight_name,
)
from bench.core.lm import Sampling
from tasks.lexicon.presets import load_policy

PROMPTS = ["the cat sat on", "a happy day", "we walked to the", "my friend said"]
SAMPLING = Sampling(max_new_tokens=8, temperature=0.9, top_p=0.95, batch_size=3)  # two generate() chunks


@pytest.fixture(scope="module")
def tiny():
    policy, tok = load_policy("tiny", steps=60)
    return policy.eval(), tok


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------------------------------------
# hf: the reference backend is lm.sample itself


def test_hf_backend_returns_exactly_what_lm_sample_returns(tiny):
    policy, tok = tiny
    torch.manual_seed(7)
    ref = lm.sample(policy, tok, PROMPTS, 2, SAMPLING)
    rng_after_ref = torch.get_rng_state()

    gen = make_generator("hf", policy, tok)
    assert isinstance(gen, HFGenerator) and isinstance(gen, Generator)
    torch.manual_seed(7)
    got = gen.sample(PROMPTS, 2, SAMPLING)
    assert got.prompt_ids == ref.prompt_ids
    assert got.response_ids == ref.response_ids
    assert got.texts == ref.texts
    assert got.new_tokens == ref.new_tokens > 0
    assert torch.equal(torch.get_rng_state(), rng_after_ref)  # the same draws from the global RNG


def test_hf_sync_is_a_no_op(tiny):
    policy, tok = tiny
    gen = make_generator("hf", policy, tok)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    rng = torch.get_rng_state()
    gen.sync(policy)
    gen.close()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


# ---------------------------------------------------------------------------------------------
# The factory


def test_an_unknown_generator_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"^unknown generator 'sglang'; known: hf, vllm$"):
        check_generator("sglang")
    with pytest.raises(ValueError, match="unknown generator"):
        make_generator("sglang", None, None)


def test_the_hf_backend_takes_no_options(tiny):
    policy, tok = tiny
    with pytest.raises(TypeError):
        make_generator("hf", policy, tok, gpu_memory_utilization=0.5)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_absent_fails_in_one_line_before_anything_runs():
    assert VLLM_MISSING == (
        "train.generator=vllm needs vLLM, which is not installed here: install the `vllm` extra "
        "(pip install -e '.[vllm]') in its own CUDA environment, since vLLM pins its own torch"
    )
    assert "\n" not in VLLM_MISSING
    with pytest.raises(GeneratorUnavailable) as err:
        check_generator("vllm")
    assert str(err.value) == VLLM_MISSING
    # No policy and no tokenizer: the check comes first, nothing is touched.
    with pytest.raises(GeneratorUnavailable) as err:
        make_generator("vllm", None, None, gpu_memory_utilization=0.4)
    assert str(err.value) == VLLM_MISSING


# ---------------------------------------------------------------------------------------------
# Sampling parameters and seeds


def test_sampling_maps_exactly_onto_vllm_sampling_params():
    assert vllm_sampling_kwargs(Sampling(max_new_tokens=24, temperature=0.7, top_p=0.9), 2, 123, 0) == {
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,  # disabled, as lm.sample's top_k=0
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": 24,
        "min_tokens": 0,
        "seed": 123,
        "stop_token_ids": [0],
        "ignore_eos": False,
        "detokenize": False,
        "logprobs": None,
    }
    default = vllm_sampling_kwargs(Sampling(), 1, 5)
    assert (default["temperature"], default["top_p"], default["max_tokens"]) == (1.0, 1.0, 24)
    assert default["stop_token_ids"] == []
    assert "batch_size" not in default  # vLLM batches by itself
    with pytest.raises(ValueError):
        vllm_sampling_kwargs(Sampling(), 0, 5)
    with pytest.raises(ValueError):
        vllm_sampling_kwargs(Sampling(temperature=0.0), 2, 5)
    # The Emotion protocol's settings: top-k 50, a 128-token total budget for a 100-token prompt.
    emotion = vllm_sampling_kwargs(Sampling(128, 0.7, 0.95, top_k=50, max_total_tokens=128), 1, 5, None, 100)
    assert (emotion["top_k"], emotion["max_tokens"]) == (50, 28)


def test_seeds_follow_the_global_torch_rng_and_never_share_a_stream():
    torch.manual_seed(11)
    first = draw_seed()
    torch.manual_seed(11)
    assert draw_seed() == first
    torch.manual_seed(12)
    assert draw_seed() != first
    assert request_seeds(100, 3, 2) == [100, 102, 104]
    # vLLM seeds sample j of a request with seed + j: all n*k streams of a call differ.
    streams = {s + j for s in request_seeds(first, 50, 4) for j in range(4)}
    assert len(streams) == 200


def test_preserved_rng_undoes_reseeding():
    random.seed(1)
    torch.manual_seed(1)
    py, th = random.getstate(), torch.get_rng_state()
    with preserved_rng():
        random.seed(99)
        torch.manual_seed(99)
        torch.rand(3)
    assert random.getstate() == py
    assert torch.equal(torch.get_rng_state(), th)


# ---------------------------------------------------------------------------------------------
# Weight sync: names and dtypes (pure functions over a state_dict)


def check_weights(model: torch.nn.Module, pairs: list, dtype=torch.bfloat16) -> None:
    params = dict(model.named_parameters())  # tied weights appear once here
    assert [n for n, _ in pairs] == list(params)
    for name, tensor in pairs:
        assert tensor.dtype == dtype and tensor.shape == params[name].shape
        assert torch.equal(tensor, params[name].detach().to(dtype))


def test_engine_weights_of_tiny_gpt2_send_each_weight_once_in_bf16(tiny):
    policy, _ = tiny
    state = policy.state_dict()
    assert "lm_head.weight" in state  # tied to transformer.wte.weight
    pairs = list(engine_weights(state))
    check_weights(policy, pairs)
    names = [n for n, _ in pairs]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    # HF Conv1D layout is sent as it is: vLLM's GPT-2 loader transposes c_attn/c_proj/c_fc itself.
    c_attn = dict(pairs)["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.shape == (policy.config.n_embd, 3 * policy.config.n_embd)
    assert next(policy.parameters()).dtype == torch.float32  # the master weights are not touched


@pytest.mark.parametrize("tied", [False, True])
def test_engine_weights_of_a_tiny_llama_keep_hf_checkpoint_names(tied):
    model = tiny_llama(tied)
    pairs = list(engine_weights(model.state_dict()))
    check_weights(model, pairs)
    names = [n for n, _ in pairs]
    # vLLM's Llama loader takes these names and stacks q/k/v and gate/up into its fused layers.
    assert (
        "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names
    )
    assert ("lm_head.weight" in names) is not tied
    assert not any("rotary_emb" in n for n in names)
    assert len(names) == 1 + 2 * 9 + 1 + (0 if tied else 1)


def test_wrapper_prefixes_are_stripped_and_non_weights_skipped():
    assert vllm_weight_name("module._orig_mod.model.norm.weight") == "model.norm.weight"
    assert (
        vllm_weight_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert vllm_weight_name("model.modules.weight") == "model.modules.weight"  # only a leading prefix
    state = {
        "module.transformer.h.0.attn.c_attn.bias": torch.ones(6),
        "module.transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),  # causal mask
        "module.model.rotary_emb.inv_freq": torch.ones(4),
        "module.position_ids": torch.arange(4),
    }
    pairs = dict(engine_weights(state, torch.float16))
    assert list(pairs) == ["transformer.h.0.attn.c_attn.bias", "position_ids"]
    assert pairs["transformer.h.0.attn.c_attn.bias"].dtype == torch.float16
    assert pairs["position_ids"].dtype == torch.int64  # only floating tensors change dtype
    assert "transformer.h.0.attn.bias".endswith(NOT_WEIGHTS)


def test_chunks_bound_the_bytes_per_load():
    weights = [(f"w{i}", torch.zeros(n, dtype=torch.bfloat16)) for i, n in enumerate([10, 10, 30, 5, 5])]
    got = [[name for name, _ in chunk] for chunk in chunks(iter(weights), max_bytes=40)]
    assert got == [["w0", "w1"], ["w2"], ["w3", "w4"]]  # w2 (60 bytes) alone
    assert [[n for n, _ in c] for c in chunks(iter(weights), max_bytes=1)] == [[n] for n, _ in weights]


# ---------------------------------------------------------------------------------------------
# The colocate backend against a recording engine (the only fake)


class FakeEngine:
    """A stand-in for ``vllm.LLM`` that records what it receives (the only fake in this file).

    ``collective_rpc`` calls a callable with the worker as its first argument, as vLLM's executors
    do; the worker's model records every ``load_weights`` call.
    """

    def __init__(self, eos: int):
        self.eos = eos
        self.calls: list[tuple] = []
        self.loads: list[list[tuple[str, torch.Tensor]]] = []
        self.requests: list[tuple[dict, dict]] = []
        model = SimpleNamespace(load_weights=self._load_weights)
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))

    def _load_weights(self, weights):
        self.loads.append([(name, tensor.clone()) for name, tensor in weights])
        self.calls.append(("load_weights",))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", *(tags or ())))

    def reply(self, prompt: list[int], j: int, max_tokens: int) -> list[int]:
        ids = [(prompt[-1] + 3 * j + t) % 50 + 1 for t in range(max_tokens)]  # never the EOS (0)
        return [*ids[:3], self.eos] if j % 2 == 0 else ids  # even samples stop at EOS

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        self.requests = list(zip(prompts, sampling_params, strict=True))
        return [
            SimpleNamespace(
                outputs=[  # in reverse order: the backend must sort by index
                    SimpleNamespace(
                        index=j, token_ids=self.reply(prompt["prompt_token_ids"], j, p["max_tokens"])
                    )
                    for j in reversed(range(p["n"]))
                ]
            )
            for prompt, p in self.requests
        ]

    def pushed(self) -> list[tuple[str, torch.Tensor]]:
        return [pair for load in self.loads for pair in load]


def colocated(policy, tok, **options):
    engine = FakeEngine(tok.eos_token_id)
    return VLLMGenerator(policy, tok, engine=engine, sampling_params=dict, **options), engine


def test_sync_sends_every_parameter_once_with_its_name_shape_and_bf16(tiny):
    policy, tok = copy.deepcopy(tiny[0]), tiny[1]
    gen, engine = colocated(policy, tok, sleep_level=1, sync_chunk_bytes=64 * 1024)
    assert isinstance(gen, Generator)
    # Construction: the dummy engine weights are replaced at once, then the engine sleeps.
    assert len(engine.loads) > 1  # several chunks
    params = dict(policy.named_parameters())
    counts = Counter(name for name, _ in engine.pushed())
    assert set(counts) == set(params) and set(counts.values()) == {1}
    for name, tensor in engine.pushed():
        assert tensor.shape == params[name].shape and tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, params[name].detach().to(torch.bfloat16))
    assert engine.calls[-2:] == [("reset_prefix_cache",), ("sleep", 1)]

    # After an optimizer step: the engine wakes its weights, takes the new ones, drops the prefix cache.
    with torch.no_grad():
        policy.transformer.h[1].mlp.c_fc.weight.add_(1.0)
    engine.calls.clear()
    engine.loads.clear()
    gen.sync(policy)
    assert engine.calls[0] == ("wake_up", "weights")
    assert engine.calls[-1] == ("reset_prefix_cache",)
    assert {c for c in engine.calls[1:-1]} == {("load_weights",)}
    pushed = dict(engine.pushed())
    assert len(pushed) == len(params)
    expected = policy.transformer.h[1].mlp.c_fc.weight.detach().to(torch.bfloat16)
    assert torch.equal(pushed["transformer.h.1.mlp.c_fc.weight"], expected)

    # A rollout wakes the KV cache only (the weights are awake since the sync), then sleeps again.
    engine.calls.clear()
    gen.sample(PROMPTS[:2], 2, SAMPLING)
    assert engine.calls == [("wake_up", "kv_cache"), ("generate", 2), ("sleep", 1)]


def test_sample_lays_out_the_engine_reply_as_lm_samples(tiny):
    policy, tok = tiny
    gen, engine = colocated(policy, tok, sleep_level=0)
    k = 3
    torch.manual_seed(3)
    base = draw_seed()
    after_one_draw = torch.get_rng_state()
    torch.manual_seed(3)
    random.seed(5)
    py = random.getstate()
    got = gen.sample(PROMPTS, k, SAMPLING)

    prompt_ids = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    assert got.prompt_ids == prompt_ids
    assert [r[0]["prompt_token_ids"] for r in engine.requests] == prompt_ids  # token ids, no re-tokenizing
    seeds = request_seeds(base, len(PROMPTS), k)
    assert [p for _, p in engine.requests] == [
        vllm_sampling_kwargs(SAMPLING, k, seed, tok.eos_token_id) for seed in seeds
    ]
    expected = [engine.reply(ids, j, SAMPLING.max_new_tokens) for ids in prompt_ids for j in range(k)]
    assert got.response_ids == expected  # sample j of prompt i at i*k + j
    for i in range(len(PROMPTS)):  # even samples stopped at EOS and keep it, odd ones ran to max_tokens
        for j in range(k):
            row = got.response_ids[i * k + j]
            assert (row[-1] == tok.eos_token_id) == (j % 2 == 0)
            assert len(row) == (4 if j % 2 == 0 else SAMPLING.max_new_tokens)
    assert got.texts == tok.batch_decode(expected, skip_special_tokens=True)
    assert got.new_tokens == sum(map(len, expected))
    # One draw from the global torch RNG, nothing else touched.
    assert torch.equal(torch.get_rng_state(), after_one_draw)
    assert random.getstate() == py
    assert all(c[0] not in ("sleep", "wake_up") for c in engine.calls)  # sleep mode off


def test_a_level_2_sleep_is_followed_by_a_full_push_before_sampling(tiny):
    policy, tok = tiny
    gen, engine = colocated(policy, tok, sleep_level=2)
    assert engine.calls[-1] == ("sleep", 2)
    engine.calls.clear()
    engine.loads.clear()
    gen.sample(PROMPTS[:1], 2, SAMPLING)  # no sync since the sleep dropped the weights
    assert engine.calls[0] == ("wake_up", "weights")
    assert engine.calls[-4:] == [
        ("reset_prefix_cache",),
        ("wake_up", "kv_cache"),
        ("generate", 1),
        ("sleep", 2),
    ]
    assert {name for name, _ in engine.pushed()} == {name for name, _ in policy.named_parameters()}


def test_the_colocate_backend_checks_its_options(tiny):
    policy, tok = tiny
    with pytest.raises(ValueError, match="sleep_level"):
        colocated(policy, tok, sleep_level=3)
    with pytest.raises(TypeError):
        colocated(policy, tok, gpu_memory=0.5)  # not a VLLMOptions field


def test_the_total_budget_caps_each_response_by_its_own_prompt_length():
    """``max_total_tokens`` bounds prompt + response per prompt in a batch of unequal prompts, as
    ``generate(max_length=...)`` does for one unpadded prompt; ``max_prompt_tokens`` keeps a prompt's
    first tokens; ``top_k`` reaches generate."""
    model, tok = load_policy("tiny")
    prompts = ["the", "the storm came over the hills and the"]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] < lengths[1]
    total = lengths[1] + 3
    torch.manual_seed(0)
    out = lm.sample(model, tok, prompts, 2, Sampling(50, 1.0, 1.0, top_k=5, max_total_tokens=total))
    eos = tok.eos_token_id
    for i, ids in enumerate(out.response_ids):
        budget = total - lengths[i // 2]
        assert len(ids) <= budget
        assert len(ids) == budget or ids[-1] == eos  # only an EOS stops a response early
    assert Sampling(max_prompt_tokens=2).prompt([5, 6, 7]) == [5, 6]
    assert Sampling(max_new_tokens=10, max_total_tokens=8).budget(3) == 5
    assert Sampling(max_new_tokens=4, max_total_tokens=8).budget(3) == 4
    assert Sampling(max_new_tokens=4).budget(300) == 4
