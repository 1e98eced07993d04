"""Our ArmoRM implementation on a tiny random checkpoint in the published layout (CPU, seconds)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from _armorm_standin import save_tensors, write_armorm, write_policy
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from tasks.armorm import HEADS, ArmoRMConfig, ArmoRMPanel
from tasks.armorm_model import (
    GATING_TEXT,
    CheckpointMismatch,
    gating_positions,
    load_armorm,
    reward_positions,
)
from tasks.hub import HubUnavailable

# The 19 objectives in the order of the published model card (RLHFlow/RLHF-Reward-Modeling armo-rm/README.md)
PUBLISHED_ATTRIBUTES = [
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
]  # fmt: skip
PAIRS = [
    ("what is the best way to learn a language?", "sure, here is an answer: read every day."),
    ("hello", "thank you."),
    (
        "explain how tides work.",
        "the moon pulls the water and the earth turns, so the sea rises twice a day.",
    ),
]


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    folder = write_armorm(tmp_path_factory.mktemp("armorm") / "rm", seed=3)
    (folder / "modeling_custom.py").write_text(
        f"open({str(folder / 'REMOTE_CODE_RAN')!r}, 'w').close()\nraise RuntimeError('remote code ran')\n"
    )
    return folder


@pytest.fixture(scope="module")
def tok(rm):
    return AutoTokenizer.from_pretrained(rm)


@pytest.fixture(scope="module")
def model(rm, tok):
    return load_armorm(rm, torch.float32, "cpu", tok.encode(GATING_TEXT, add_special_tokens=False))


def encode(tok, pairs, **kw):
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        for p, r in pairs
    ]
    return tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False, **kw)


def test_loads_by_name_as_float_outputs_and_runs_no_remote_code(rm, model, tok):
    enc = encode(tok, PAIRS)
    out = model(**enc)
    assert out.rewards.shape == (3, 19) and out.gating.shape == (3, 19) and out.score.shape == (3,)
    assert all(t.dtype == torch.float32 for t in (out.rewards, out.gating, out.score))
    assert model.gating.temperature == 10.0 and len(model.gating.layers) == 4
    assert not (rm / "REMOTE_CODE_RAN").exists()
    assert list(HEADS) == [*PUBLISHED_ATTRIBUTES, "ArmoRM"]
    raw = load_file(rm / "model.safetensors")
    assert raw["regression_layer.weight"].dtype == torch.float32  # heads as published: float32 on disk
    assert raw["model.embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(model.reward_transform_matrix, raw["reward_transform_matrix"])


def test_sharded_checkpoint_and_bf16_load_the_same_model(tmp_path, model, tok):
    sharded = write_armorm(tmp_path / "sharded", seed=3, shards=3)
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    enc = encode(tok, PAIRS)
    torch.testing.assert_close(
        load_armorm(sharded, torch.float32, "cpu", model.gating_pattern)(**enc).score, model(**enc).score
    )
    bf16 = load_armorm(sharded, torch.bfloat16, "cpu", model.gating_pattern)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # heads too, as the published usage runs
    out = bf16(**enc)
    assert out.score.dtype == torch.float32
    torch.testing.assert_close(out.score, model(**enc).score, atol=0.1, rtol=0.05)


def broken_copy(rm, tmp_path, edit, shards=1):
    folder = tmp_path / "broken"
    shutil.copytree(rm, folder)
    tensors = load_file(rm / "model.safetensors")
    edit(tensors)
    save_tensors(folder, tensors, shards)
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("gating.logit_scale"), r"missing tensors: gating\.logit_scale$"),
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing tensors: model\.layers\.1\.mlp\.up_proj",
        ),
        (lambda t: t.update({"score.weight": torch.zeros(1, 16)}), r"unexpected tensors: score\.weight$"),
        (
            lambda t: t.update({"regression_layer.weight": torch.zeros(20, 16)}),
            r"shape mismatches: regression_layer\.weight \[20, 16\] \(expected \[19, 16\]\)",
        ),
    ],
)
def test_a_layout_mismatch_is_one_clear_error(rm, tmp_path, edit, message):
    folder = broken_copy(rm, tmp_path, edit)
    with pytest.raises(CheckpointMismatch, match=message) as err:
        load_armorm(folder, torch.float32)
    assert str(folder) in str(err.value)


def test_sharded_mismatches_and_missing_files(rm, tmp_path):
    folder = broken_copy(rm, tmp_path, lambda t: t.update({"extra.bias": torch.zeros(2)}), shards=2)
    with pytest.raises(CheckpointMismatch, match=r"unexpected tensors: extra\.bias"):
        load_armorm(folder, torch.float32)
    next(folder.glob("model-00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointMismatch, match="names shards that are not in"):
        load_armorm(folder, torch.float32)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointMismatch, match=r"neither model\.safetensors nor"):
        load_armorm(folder, torch.float32)


def test_gating_position_is_the_start_of_the_last_assistant_turn(tok, model):
    enc = encode(tok, PAIRS)
    pattern = tok.encode(GATING_TEXT, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(pattern)[:2] == ["<|eot_id|>", "<|start_header_id|>"]
    pos = gating_positions(enc["input_ids"], pattern)
    for row, p in zip(enc["input_ids"].tolist(), pos.tolist(), strict=True):
        assert row[p : p + len(pattern)] == pattern
        user = row.index(tok.convert_tokens_to_ids("<|end_header_id|>")) + 1
        assert tok.decode(row[user:p]).strip() in {q for q, _ in PAIRS}, "t_g is the token after the prompt"
    two_turns = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "thank you."},
        {"role": "user", "content": "explain how tides work."},
        {"role": "assistant", "content": "the moon pulls."},
    ]
    ids = tok.apply_chat_template(two_turns, tokenize=True, return_dict=False)
    starts = [i for i in range(len(ids)) if ids[i : i + len(pattern)] == pattern]
    assert len(starts) == 2 and gating_positions(torch.tensor([ids]), pattern).tolist() == [starts[-1]]
    with pytest.raises(ValueError, match="not in rows"):
        gating_positions(enc["input_ids"][:, :8], pattern)  # truncated inside the prompt


def published_reward_position(ids: list[int], pad: int) -> int:
    """The published rule: (index of the first pad token - 1) mod T."""
    first = ids.index(pad) if pad in ids else 0
    return (first - 1) % len(ids)


def test_hand_computed_score_matches(rm, tok, model):
    """g = s softmax(MLP(h_{t_g}) / tau), r = W h_{t_r}, score = sum_k g_k (r M)_k, with plain torch."""
    raw = {n: t.float() for n, t in load_file(rm / "model.safetensors").items()}
    config = json.loads((rm / "config.json").read_text())
    backbone = LlamaModel(LlamaConfig(**config)).eval()
    backbone.load_state_dict({n[len("model.") :]: t for n, t in raw.items() if n.startswith("model.")})
    enc = encode(tok, PAIRS)
    with torch.no_grad():
        hidden = backbone(**enc).last_hidden_state
        out = model(**enc)
    pattern = tok.encode(GATING_TEXT, add_special_tokens=False)
    tau, scale, transform = (
        config["gating_temperature"],
        raw["gating.logit_scale"][0],
        raw["reward_transform_matrix"],
    )
    assert tau == 10 and scale == pytest.approx(1.7)
    for b, ids in enumerate(enc["input_ids"].tolist()):
        t_g = max(i for i in range(len(ids)) if ids[i : i + len(pattern)] == pattern)
        t_r = published_reward_position(ids, config["pad_token_id"])
        assert t_r == int(enc["attention_mask"][b].sum()) - 1
        x = hidden[b, t_g]
        for i in range(3):
            x = torch.relu(x @ raw[f"gating.layers.{i}.weight"].T + raw[f"gating.layers.{i}.bias"])
        logits = x @ raw["gating.layers.3.weight"].T + raw["gating.layers.3.bias"]
        gate = torch.exp(logits / tau) / torch.exp(logits / tau).sum() * scale
        rewards = raw["regression_layer.weight"] @ hidden[b, t_r]
        score = sum(gate[j] * sum(rewards[k] * transform[k, j] for k in range(19)) for j in range(19))
        torch.testing.assert_close(out.rewards[b], rewards, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.gating[b], gate, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.score[b], score, atol=1e-5, rtol=1e-5)
        # the model card's identity: coefficients g M^T on the raw rewards give the same score
        torch.testing.assert_close((rewards * (gate @ transform.T)).sum(), out.score[b], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.gating, F.softmax(out.gating, -1)), "the gate is not uniform"


def test_reward_position_ignores_padding_and_batching(tok, model):
    enc = encode(tok, PAIRS)
    assert reward_positions(enc["attention_mask"]).tolist() == [
        int(n) - 1 for n in enc["attention_mask"].sum(1)
    ]
    together = model(**enc).score
    alone = torch.cat([model(**encode(tok, [pair])).score for pair in PAIRS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_panel_scores_in_chunks_and_checks_prompt_lengths(rm):
    cfg = ArmoRMConfig(reward_model=str(rm), reward_dtype="float32", reward_batch=2)
    panel = ArmoRMPanel(cfg)
    prompts, responses = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    heads = panel.score(prompts, responses)
    assert heads.shape == (3, 20) and heads.dtype == torch.float64
    enc = encode(panel.tok, PAIRS)
    torch.testing.assert_close(heads[:, 19].float(), panel.model(**enc).score, atol=1e-5, rtol=1e-5)
    assert all(panel.fits(p) for p in prompts)
    panel.max_length = 12
    assert not any(panel.fits(p) for p in prompts)  # left out of the task's splits, with a warning
    panel.max_length = 40  # the end of the long response is cut, as the published scorer truncates
    assert panel.encode(prompts, responses)["input_ids"].shape[1] == 40
    assert panel.score(prompts, responses).shape == (3, 20)
    assert not (rm / "REMOTE_CODE_RAN").exists()


def test_offline_hub_checkpoint_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match=r"huggingface-cli download RLHFlow/ArmoRM-Llama3-8B-v0\.1"):
        load_armorm("RLHFlow/ArmoRM-Llama3-8B-v0.1")
    with pytest.raises(HubUnavailable, match="not a local folder and not a Hub repository id"):
        load_armorm("/no/such/folder/for armorm")


def test_plan_models_are_the_published_shapes(rm, tmp_path):
    import tasks
    from tasks.armorm import armorm_models, policy_id

    spec = tasks.get("armorm")
    assert spec.gpus == 1 and spec.models is armorm_models
    for size, hub, layers, hidden in (("1b", "1B", 16, 2048), ("3B", "3B", 28, 3072)):
        assert policy_id(ArmoRMConfig(size=size)) == f"meta-llama/Llama-3.2-{hub}-Instruct"
        policy, reference, reward = armorm_models(ArmoRMConfig(size=size))
        assert (policy.role, reference.role, reward.role) == ("policy", "reference", "reward")
        assert policy.config == reference.config and policy.name == f"meta-llama/Llama-3.2-{hub}-Instruct"
        assert (policy.config["num_hidden_layers"], policy.config["hidden_size"]) == (layers, hidden)
        assert policy.config["tie_word_embeddings"] and policy.config["vocab_size"] == 128256
    published = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "num_objectives": 19,
        "gating_hidden_dim": 1024,
    }
    assert published.items() <= reward.config.items() and reward.name == "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    local = write_policy(tmp_path / "policy")
    policy, _, reward = armorm_models(ArmoRMConfig(size=str(local), reward_model=str(rm)))
    assert policy.config["hidden_size"] == 16 and policy_id(ArmoRMConfig(size=str(local))) == str(local)
    assert (reward.config["hidden_size"], reward.config["gating_hidden_dim"]) == (16, 8)
