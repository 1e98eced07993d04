"""Resource readings recorded in every run: peak memory, threads."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb() -> dict:
    """Peak resident memory of this process and, where used, peak CUDA memory (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    out = {"rss": round(rss_mb, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
