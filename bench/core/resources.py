"""Resource readings recorded in every run: peak memory, threads."""

from __future__ import annotations

import resource
import sys

import torch


def loop_timings(seconds: float, iterations: int, pairs: int) -> dict:
    """The timings of a training loop that counts pairs (the linear and reward-model loops)."""
    return {
        "train_s": seconds,
        "s_per_iteration": seconds / iterations,
        "pairs_per_s": pairs / seconds,
        "peak_memory_mb": peak_memory_mb(),
    }


def peak_memory_mb() -> dict:
    """Peak resident memory of this process and, where used, peak CUDA memory (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    out = {"rss": round(rss_mb, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak if known (CUDA only); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def utilisation(
    params: int, train_tokens: int, gen_tokens: int, seconds: float, device: torch.device
) -> dict:
    """Model FLOPs (6N per trained token, 2N per generated token) per second, and MFU when the
    device's peak is known."""
    flops = 6 * params * train_tokens + 2 * params * gen_tokens
    rate = flops / max(seconds, 1e-9)
    peak = peak_flops(device)
    return {"model_flops_per_s": rate, "mfu": rate / peak if peak else None}
