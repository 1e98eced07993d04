"""Log-probs from the LM head at response positions only equal the full-vocabulary computation at
every position (values and gradients), for GPT-2 and Llama layouts, chunked or not (issue 18)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import bench.core.lm as lm
from bench.core.lm import sequence_batch, split_head, token_logps


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def llama():
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def full_logps(model, batch, temperature, inputs_embeds=None):
    """The reference: log-softmax over the whole vocabulary at every position, then masked."""
    inputs = {"input_ids": batch.input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    logits = model(**inputs, attention_mask=batch.attention_mask).logits[:, :-1].float() / temperature
    picked = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return picked * batch.target_mask


def batch_of(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    responses = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (6, 1, 9, 4)]
    return sequence_batch(prompts, responses, pad_id=0)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_position_logps_equal_the_full_computation(build, temperature):
    torch.manual_seed(0)
    model = build().eval()
    assert split_head(model) is not None
    batch = batch_of()
    ours = token_logps(model, batch, temperature)
    ours.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = full_logps(model, batch, temperature)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours[~batch.target_mask] == 0).all()
    for mine, theirs in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_no_grad_chunks_and_input_embeddings_agree(monkeypatch):
    torch.manual_seed(1)
    model = llama().eval()
    batch = batch_of(3)
    with torch.no_grad():
        whole = token_logps(model, batch)
        monkeypatch.setattr(lm, "HEAD_CHUNK_BYTES", 4 * 97 * 3)  # 3 positions per chunk
        chunked = token_logps(model, batch)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    kept: list[torch.Tensor] = []
    ours = token_logps(model, batch, 1.0, embeds=kept)
    (embeds,) = kept  # looked up inside, as a sharded root needs
    (g_ours,) = torch.autograd.grad(ours.sum(), embeds)
    leaf = embeds.detach().requires_grad_(True)
    ref = full_logps(model, batch, 1.0, inputs_embeds=leaf)
    (g_ref,) = torch.autograd.grad(ref.sum(), leaf)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_a_model_that_transforms_its_logits_takes_the_full_forward():
    model = gpt2().eval()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 declares it
    assert split_head(model) is None
    batch = batch_of()
    torch.testing.assert_close(token_logps(model, batch), full_logps(model, batch, 1.0), rtol=1e-5, atol=1e-5)
