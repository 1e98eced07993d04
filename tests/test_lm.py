"""Sequence log-probs: response tokens only, prompt as exact prefix, padding and temperature."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bench.core.lm import sequence_batch, sequence_logps


def tiny_model():
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def test_sequence_logps_match_the_model_loss_on_response_tokens():
    model = tiny_model()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 0]]
    batch = sequence_batch(prompts, responses, pad_id=39)
    got = sequence_logps(model, batch, temperature=1.0)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = torch.tensor([p + r])
        labels = ids.clone()
        labels[0, : len(p)] = -100  # HF's own masked mean over response tokens
        loss = model(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(got[i], -loss * len(r), rtol=1e-5, atol=1e-5)
    assert batch.target_mask.sum().item() == 6 and batch.input_ids[0, -1].item() == 39


def test_temperature_divides_the_logits():
    model = tiny_model()
    batch = sequence_batch([[3, 4]], [[5, 6, 7]], pad_id=39)
    logits = model(input_ids=batch.input_ids).logits[0, :-1] / 0.7
    logp = torch.log_softmax(logits, -1)
    expected = sum(logp[t, batch.input_ids[0, t + 1]] for t in (1, 2, 3))
    torch.testing.assert_close(
        sequence_logps(model, batch, temperature=0.7)[0], expected, rtol=1e-5, atol=1e-5
    )


def test_padding_does_not_change_a_row():
    model = tiny_model()
    alone = sequence_logps(model, sequence_batch([[3, 4]], [[5, 6]], pad_id=39))
    padded = sequence_logps(
        model, sequence_batch([[3, 4], [1, 2, 3, 4, 5]], [[5, 6], [7, 8, 9, 10]], pad_id=39)
    )
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-6)
