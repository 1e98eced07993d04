"""Paired timing of the training step with log-probs from the LM head at response positions only
against the previous full-vocabulary computation at every position (issue 18, item 1).

    python scripts/head_positions_perf.py [--reps 9] [--threads 1]

Both arms run in one process on the same model and batch, interleaved round by round, so machine
noise hits them alike; prints the median step time of each and their ratio per (model, pairs,
method)."""

from __future__ import annotations

import argparse
import statistics

import torch

import bench.core.lm as lm
import methods
from bench.studies.perf import PerfConfig, build_model, pair_batch, step


def every_position_logps(model, batch, temperature=1.0, inputs_embeds=None):
    """The computation before: the LM head and log-softmax at every position, then masked."""
    inputs = {"input_ids": batch.input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    logits = model(**inputs, attention_mask=batch.attention_mask).logits[:, :-1].float() / temperature
    picked = logits.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return picked * batch.target_mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = {"positions": lm.token_logps, "every": every_position_logps}
    for name, pairs in (("tiny", 64), ("small", 16)):
        cfg = PerfConfig(batch=pairs)
        policy = build_model(name)
        batch = pair_batch(policy.config.vocab_size, cfg)
        opt = torch.optim.AdamW(policy.parameters(), lr=0.0)  # lr 0: every round sees the same weights
        for method_name, radius in (("rebel", 0.0), ("w-rebel", 0.01)):
            method = methods.get(method_name)
            times = {arm: [] for arm in arms}
            for rep in range(args.reps + 1):  # the first round warms up and is dropped
                for arm, fn in arms.items():
                    lm.token_logps = fn
                    seconds = step(policy, opt, method, batch, radius)
                    if rep:
                        times[arm].append(seconds)
            lm.token_logps = arms["positions"]
            med = {arm: statistics.median(t) for arm, t in times.items()}
            print(
                f"{name:5s} {pairs:3d} pairs {method_name:8s} every position {med['every'] * 1e3:8.1f} ms  "
                f"response positions {med['positions'] * 1e3:8.1f} ms  "
                f"ratio {med['positions'] / med['every']:.2f}"
            )


if __name__ == "__main__":
    main()
