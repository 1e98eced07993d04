"""Causal-LM plumbing for the training loop: sampling, pair batches, sequence log-probs.

Prompts are tokenized on their own and responses are appended as token ids, so the prompt is an
exact prefix of every sequence (no re-tokenization of concatenated strings). Log-probs are taken
only at response tokens, with the sampling temperature applied to the logits, padding masked.
Works with any ``transformers`` causal LM; embeddings are reached through
``get_input_embeddings()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Samples:
    prompt_ids: list[list[int]]  # one per prompt
    response_ids: list[list[int]]  # k per prompt, sample j of prompt i at i*k + j; ends with EOS if one came
    texts: list[str]
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def first(self, n: int, k: int) -> Samples:
        """The samples of the first ``n`` prompts (``k`` per prompt)."""
        return Samples(self.prompt_ids[:n], self.response_ids[: n * k], self.texts[: n * k], self.seconds)


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled: temperature, nucleus ``top_p``, ``top_k`` (0: off) and length.

    A response has at most ``max_new_tokens`` tokens and, when ``max_total_tokens`` is set, at most
    ``max_total_tokens - len(prompt)`` (``generate(max_length=...)`` of one unpadded prompt, as the
    DRO-REBEL Emotion code samples). ``max_prompt_tokens`` (0: off) keeps a prompt's first tokens
    (a tokenizer's default right truncation).
    """

    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64  # prompts per generate() call
    top_k: int = 0
    max_total_tokens: int = 0
    max_prompt_tokens: int = 0

    def prompt(self, ids: list[int]) -> list[int]:
        """The prompt ids the policy sees: the first ``max_prompt_tokens`` when that is set."""
        return ids[: self.max_prompt_tokens] if self.max_prompt_tokens else ids

    def budget(self, prompt_len: int) -> int:
        """The most new tokens of a response to a prompt of ``prompt_len`` tokens."""
        if not self.max_total_tokens:
            return self.max_new_tokens
        return max(0, min(self.max_new_tokens, self.max_total_tokens - prompt_len))


@torch.no_grad()
def sample(model, tok, prompts: list[str], k: int, cfg: Sampling) -> Samples:
    """``k`` sampled continuations per prompt (batched, left-padded, KV cache; global torch RNG)."""
    start = time.perf_counter()
    prompt_ids = [cfg.prompt(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    eos = tok.eos_token_id
    device = next(model.parameters()).device
    responses: list[list[int]] = []
    was_training = model.training
    model.eval()
    for lo in range(0, len(prompts), cfg.batch_size):
        chunk = prompt_ids[lo : lo + cfg.batch_size]
        budgets = [cfg.budget(len(ids)) for ids in chunk]
        enc = tok.pad({"input_ids": chunk}, padding_side="left", return_tensors="pt").to(device)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=max(1, *budgets),
            num_return_sequences=k,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
        )
        for i, row in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
            row = row[: budgets[i // k]]  # a shorter prompt's budget ends before the batch's
            responses.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    return Samples(prompt_ids, responses, texts, time.perf_counter() - start)


@dataclass
class SequenceBatch:
    input_ids: Tensor  # [B, T] right-padded prompt + response
    attention_mask: Tensor  # [B, T]
    target_mask: Tensor  # [B, T - 1]: True where token t+1 is a response token

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.target_mask)))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def sequence_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Rows ``prompt_i + response_i``, right-padded, with the response-target mask."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(lengths), width), dtype=torch.long)
    target = torch.zeros((len(lengths), width - 1), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : lengths[i]] = torch.tensor(p + r)
        attn[i, : lengths[i]] = 1
        target[i, len(p) - 1 : lengths[i] - 1] = True
    return SequenceBatch(ids, attn, target)


# Config fields by which a model transforms the LM head's output inside its own forward (Gemma 2's
# soft-capping, Cohere's and Granite's logit scales): those models take the full forward.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
HEAD_CHUNK_BYTES = 2**28  # fp32 logits one no-grad LM-head chunk may hold


def split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(body, lm_head)`` of a causal LM whose logits are ``lm_head(body(x).last_hidden_state)``,
    or None for one that transforms them further (``LOGIT_TRANSFORMS``) or has no separate head."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None
    if any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS):
        return None
    return body, head


# The name under which a sharded policy carries ``_token_logps`` as one of its root's forward
# methods (``bench.loops.distributed.fully_shard_policy``): the body and the head are called here
# directly, so the root must gather its own parameters (embeddings, final norm, head) around them.
SHARDED_LOGPS = "bench_token_logps"


def token_logps(
    model, batch: SequenceBatch, temperature: float = 1.0, embeds: list[Tensor] | None = None
) -> Tensor:
    """Per-token log-probs of the targets ``[B, T-1]`` (0 outside responses).

    The LM head runs only where a response token is predicted: the body's hidden states are gathered
    at those N positions, then ``logp(y) = logit[y] / t - logsumexp(logits / t)`` in float32 over
    ``[N, V]`` instead of ``[B, T, V]`` logits (under no-grad in chunks of ``HEAD_CHUNK_BYTES``).
    Models without a plain head (``split_head``) take the full forward with the same formula.
    With ``embeds`` (a list), the input embeddings are looked up here, fed as ``inputs_embeds`` and
    appended to it, so that a gradient can be taken with respect to them (the W penalty's).
    """
    sharded = getattr(model, SHARDED_LOGPS, None)
    if sharded is not None:
        return sharded(batch, temperature, embeds)
    return _token_logps(model, batch, temperature, embeds)


def _token_logps(model, batch: SequenceBatch, temperature: float, embeds: list[Tensor] | None) -> Tensor:
    if embeds is None:
        inputs = {"input_ids": batch.input_ids}
    else:
        embeds.append(model.get_input_embeddings()(batch.input_ids))
        inputs = {"inputs_embeds": embeds[-1]}
    parts = split_head(model)
    mask = batch.target_mask.bool()
    targets = batch.input_ids[:, 1:][mask]
    if parts is None:
        logits = model(**inputs, attention_mask=batch.attention_mask).logits[:, :-1][mask]
        picked = _target_logps(logits, targets, temperature)
    else:
        body, head = parts
        hidden = body(**inputs, attention_mask=batch.attention_mask)[0][:, :-1][mask]  # [N, H]
        rows = len(hidden)
        if not torch.is_grad_enabled():  # the backward would keep every chunk's logits anyway
            rows = max(1, HEAD_CHUNK_BYTES // (4 * head.weight.shape[0]))
        picked = torch.cat(
            [
                _target_logps(head(hidden[lo : lo + rows]), targets[lo : lo + rows], temperature)
                for lo in range(0, len(hidden), rows)
            ]
            or [hidden.new_zeros(0, dtype=torch.float32)]
        )
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def _target_logps(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """``[N, V]`` logits, ``[N]`` targets -> ``log softmax(logits / t)[target]`` in float32."""
    logits = logits.float() / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model, batch: SequenceBatch, temperature: float = 1.0, embeds: list[Tensor] | None = None
) -> Tensor:
    """``log pi(response | prompt)`` per row ``[B]`` (``embeds``: as for ``token_logps``)."""
    return token_logps(model, batch, temperature, embeds).sum(-1)


LOGIT_BUDGET_BYTES = 2**30  # fp32 logits (and their softmax temporaries) one no-grad forward may hold


@torch.no_grad()
def chunked_logps(model, seqs: SequenceBatch, temperature: float = 1.0, chunk: int = 0) -> Tensor:
    """``sequence_logps`` over row chunks of at most ``chunk`` rows (0: no cap) and never more than
    keep ``rows x T x V x 12`` bytes of logits under ``LOGIT_BUDGET_BYTES``, so a long evaluation
    or a large batch of anchors is scored in bounded memory."""
    rows, width = seqs.input_ids.shape
    vocab, device = model.get_output_embeddings().weight.shape[0], next(model.parameters()).device
    fit = max(1, LOGIT_BUDGET_BYTES // (12 * vocab * width))
    chunk = min(chunk or rows, fit)
    if hasattr(model, SHARDED_LOGPS):  # every forward is a collective: all ranks take the same chunks
        agreed = torch.tensor([chunk], device=device)  # nccl: a CUDA tensor
        dist.all_reduce(agreed, dist.ReduceOp.MIN)
        chunk = int(agreed)
    parts = []
    for lo in range(0, rows, chunk):  # each chunk on the model's device (the rows may be on the host)
        sub = SequenceBatch(
            *(t[lo : lo + chunk] for t in (seqs.input_ids, seqs.attention_mask, seqs.target_mask))
        ).to(device)
        parts.append(sequence_logps(model, sub, temperature))
    return torch.cat(parts)
